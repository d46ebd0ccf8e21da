"""Readers for the formats users have, on fixtures written here in the exact on-disk layouts."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from core.data import (
    SENTIMENT_LABELS,
    TUMEMO_LABELS,
    DataFormatError,
    Dataset,
    Sample,
    decode_text,
    decode_tweet_bytes,
    load_dataset,
    load_image,
)
from core.data.records import stratified_split

GBK_TWEET = "Great day at the beach！“sunny” 今天很开心"
CP1252_TWEET = "“Nice”—the cafés were naïve"  # also valid GBK, as garbage: "揘ice敆the caf閟..."


def jpeg_bytes(colour: tuple[int, int, int] = (200, 120, 40), size: int = 32) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, format="JPEG")
    return out.getvalue()


def all_samples(dataset: Dataset) -> dict[str, Sample]:
    samples = [s for split in dataset.splits.values() for s in split]
    ids = [s.id for s in samples]
    assert len(ids) == len(set(ids)), "a sample landed in two splits"
    return {s.id: s for s in samples}


# --- text decoding ----------------------------------------------------------------------------------


def test_utf8_is_not_a_repair_and_a_bom_is_dropped() -> None:
    assert decode_tweet_bytes("Smiles 😀 all round".encode()) == ("Smiles 😀 all round", False)
    assert decode_tweet_bytes(b"\xef\xbb\xbfhello") == ("hello", False)


def test_gbk_tweet_is_recovered_and_counted_as_repaired() -> None:
    assert decode_tweet_bytes(GBK_TWEET.encode("gbk")) == (GBK_TWEET, True)


def test_cp1252_tweet_is_not_misread_as_gbk() -> None:
    assert decode_tweet_bytes(CP1252_TWEET.encode("cp1252")) == (CP1252_TWEET, True)


def test_bytes_no_codec_accepts_fall_back_to_replacement() -> None:
    assert decode_tweet_bytes(b"ok \x81") == ("ok \ufffd", True)


def test_decode_text_names_the_encoding_that_decoded_and_none_when_no_codec_does() -> None:
    assert decode_text(b"\xef\xbb\xbfhello") == ("hello", "utf-8")
    assert decode_text(GBK_TWEET.encode("gbk")) == (GBK_TWEET, "gbk")
    assert decode_text(CP1252_TWEET.encode("cp1252")) == (CP1252_TWEET, "cp1252")
    assert decode_text(b"ok \x81") == ("ok \ufffd", None)  # 0x81: neither GBK (no trail byte) nor cp1252


@given(st.binary(max_size=200))
def test_decoding_never_raises(raw: bytes) -> None:
    text, repaired = decode_tweet_bytes(raw)
    assert isinstance(text, str)
    assert repaired == (text.encode("utf-8") != raw.removeprefix(b"\xef\xbb\xbf"))


# --- MVSA -------------------------------------------------------------------------------------------


def write_mvsa(
    root: Path, header: str, rows: list[str], texts: dict[str, bytes], images: dict[str, bytes]
) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "labelResultAll.txt").write_text("\n".join([header, *rows]) + "\n")
    for sample_id, raw in texts.items():
        (root / "data" / f"{sample_id}.txt").write_bytes(raw)
    for sample_id, raw in images.items():
        (root / "data" / f"{sample_id}.jpg").write_bytes(raw)
    return root


@pytest.fixture
def mvsa_single(tmp_path: Path) -> Path:
    good = jpeg_bytes()
    rows = [
        "1\tpositive,positive",  # agree
        "2\tneutral,negative",  # one neutral -> negative; GBK text
        "3\tpositive,negative",  # conflict -> dropped
        "4\tnegative,neutral",  # -> negative; image file missing
        "5\tneutral,neutral",  # agree; image is not an image
        "6\tpositive,neutral",  # -> positive; image truncated
        "7\tbogus,positive",  # malformed
        "8\tneutral,positive",  # -> positive; neither text nor image: dropped
    ]
    texts = {str(i): f"tweet {i}".encode() for i in (1, 3, 4, 5, 6)} | {"2": GBK_TWEET.encode("gbk")}
    images = {"1": good, "2": good, "3": good, "5": b"this is not a jpeg", "6": good[: len(good) // 2]}
    return write_mvsa(tmp_path / "MVSA_Single", "ID\ttext,image", rows, texts, images)


def test_mvsa_single_merge_rules_and_damage_are_counted(mvsa_single: Path) -> None:
    dataset = load_dataset(f"mvsa-single:{mvsa_single}")
    report = dataset.report
    assert dict(report.merge) == {"agree": 2, "one_neutral": 4, "conflict_dropped": 1}
    assert (report.rows, report.kept, report.rows_malformed) == (8, 5, 1)
    assert (report.texts_repaired, report.texts_missing) == (1, 1)
    assert (report.images_missing, report.images_undecodable, report.dropped_no_modality) == (2, 2, 1)
    assert "undecodable" in report.summary()

    samples = all_samples(dataset)
    assert sorted(samples) == ["1", "2", "4", "5", "6"]
    assert {i: s.label_name for i, s in samples.items()} == {
        "1": "positive",
        "2": "negative",
        "4": "negative",
        "5": "neutral",
        "6": "positive",
    }
    assert samples["2"].text == GBK_TWEET
    assert samples["4"].image is None and samples["5"].image is None and samples["6"].image is None
    assert load_image(samples["1"]).size == (224, 224)


def test_mvsa_multiple_majority_per_modality_then_merge(tmp_path: Path) -> None:
    rows = [
        "1\tpositive,positive\tpositive,neutral\tneutral,positive",  # text pos, image pos -> agree
        "2\tpositive,negative\tneutral,neutral\tnegative,positive",  # text has no majority -> dropped
        "3\tpositive,negative\tpositive,negative\tneutral,neutral",  # pos vs neg -> dropped
        "4\tneutral,negative\tneutral,negative\tpositive,negative",  # neutral + negative -> negative
        "5\tpositive,positive",  # only one annotator: malformed
    ]
    texts = {str(i): b"some tweet" for i in range(1, 6)}
    images = {str(i): jpeg_bytes() for i in range(1, 6)}
    root = write_mvsa(tmp_path / "MVSA", "ID\ttext,image\ttext,image\ttext,image", rows, texts, images)
    dataset = load_dataset(f"mvsa-multiple:{root}")
    assert dict(dataset.report.merge) == {
        "agree": 1,
        "no_majority_dropped": 1,
        "conflict_dropped": 1,
        "one_neutral": 1,
    }
    assert dataset.report.rows_malformed == 1
    assert {i: s.label_name for i, s in all_samples(dataset).items()} == {"1": "positive", "4": "negative"}


def test_mvsa_without_label_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="labelResultAll.txt"):
        load_dataset(f"mvsa-single:{tmp_path}")


# --- 10-fold-1 --------------------------------------------------------------------------------------


def write_tenfold(root: Path, splits: dict[str, list[dict]], images: list[str]) -> Path:
    fold = root / "10-fold-1"
    fold.mkdir(parents=True)
    (root / "dataset_image").mkdir()
    for name, rows in splits.items():
        (fold / f"{name}.json").write_text(json.dumps(rows))
    for sample_id in images:
        (root / "dataset_image" / f"{sample_id}.jpg").write_bytes(jpeg_bytes())
    return fold


def test_tenfold_keeps_the_published_splits(tmp_path: Path) -> None:
    splits = {
        "train": [
            {"id": "17", "text": "lovely", "emotion_label": 0},
            {"id": "18", "text": "meh", "emotion_label": 1},
            {"id": "19", "text": "awful", "emotion_label": 2},
            {"id": "20", "text": "broken label", "emotion_label": 7},
        ],
        "dev": [{"id": "21", "text": "", "emotion_label": 2}],  # empty text, image present
        "test": [{"id": 22, "text": "no picture", "emotion_label": 0}],  # int id, image missing
    }
    fold = write_tenfold(tmp_path / "MVSA-single", splits, ["17", "18", "19", "20", "21"])
    dataset = load_dataset(f"tenfold:{fold}")
    assert dataset.label_names == SENTIMENT_LABELS
    assert {k: [s.id for s in v] for k, v in dataset.splits.items()} == {
        "train": ["17", "18", "19"],
        "dev": ["21"],
        "test": ["22"],
    }
    assert [s.label_name for s in dataset["train"]] == ["positive", "neutral", "negative"]
    assert dataset["dev"][0].text is None and dataset["test"][0].image is None
    report = dataset.report
    assert (report.rows, report.rows_malformed, report.texts_missing, report.images_missing) == (6, 1, 1, 1)


def test_tenfold_tumemo_folder_uses_the_seven_emotions(tmp_path: Path) -> None:
    rows = [
        {"id": "1", "text": "so calm", "emotion_label": 2},
        {"id": "2", "text": "grr", "emotion_label": 0},
    ]
    fold = write_tenfold(tmp_path / "TumEmo", {"train": rows, "dev": [], "test": []}, ["1", "2"])
    dataset = load_dataset(f"tenfold:{fold}")
    assert dataset.label_names == TUMEMO_LABELS
    assert [s.label_name for s in dataset["train"]] == ["calm", "angry"]


def test_tenfold_missing_or_broken_files_are_clear_errors(tmp_path: Path) -> None:
    fold = write_tenfold(tmp_path / "MVSA-single", {"train": [], "dev": []}, [])
    with pytest.raises(DataFormatError, match="test.json"):
        load_dataset(f"tenfold:{fold}")
    (fold / "test.json").write_text("{not json")
    with pytest.raises(DataFormatError, match="not JSON"):
        load_dataset(f"tenfold:{fold}")


# --- TumEmo -----------------------------------------------------------------------------------------


def test_tumemo_labels_and_seeded_stratified_split(tmp_path: Path) -> None:
    root = tmp_path / "TumEmo"
    (root / "data").mkdir(parents=True)
    emotions = ["Happy", "Sad", "Calm"]
    lines = ["ID Emotion"] + [f"{i} {emotions[i % 3]}" for i in range(30)] + ["30 Sleepy", "31"]
    (root / "all_data_id_and_label.txt").write_text("\n".join(lines) + "\n")
    for i in range(32):
        (root / "data" / f"{i}.txt").write_bytes(f"post {i}".encode())
        (root / "data" / f"{i}.jpg").write_bytes(jpeg_bytes())
    dataset = load_dataset(f"tumemo:{root}")
    assert dataset.report.rows_malformed == 2
    assert dataset.sizes() == {"train": 24, "dev": 3, "test": 3}
    for split in ("train", "dev", "test"):
        counts = dataset.label_counts(split)
        assert counts["happy"] == counts["sad"] == counts["calm"] == len(dataset[split]) // 3
    assert all(s.label_name == emotions[int(s.id) % 3].lower() for s in all_samples(dataset).values())

    again = load_dataset(f"tumemo:{root}", seed=0)
    other = load_dataset(f"tumemo:{root}", seed=1)
    assert [s.id for s in again["test"]] == [s.id for s in dataset["test"]]
    assert [s.id for s in other["test"]] != [s.id for s in dataset["test"]]


# --- JSONL in the service's input schema ------------------------------------------------------------


def post(sample_id: str, **fields: object) -> str:
    doc = {
        "schema_version": 1,
        "id": sample_id,
        "text": f"text of {sample_id}",
        "image": None,
        "created_at": "2024-05-01T12:00:00Z",
        "metadata": {"lang": "en"},
        "label": "positive",
    }
    doc.update(fields)
    return json.dumps(doc)


def test_jsonl_reads_every_image_form_and_counts_bad_lines(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg_bytes())
    elsewhere = tmp_path / "elsewhere.jpg"
    elsewhere.write_bytes(jpeg_bytes())
    lines = [
        post("b64", image={"base64": base64.b64encode(jpeg_bytes()).decode()}, label=2),
        post("path", image={"path": "img/a.jpg"}, label="Neutral"),
        post("file-url", image={"url": elsewhere.as_uri()}),
        post("remote", image={"url": "https://example.com/x.jpg"}),
        post("bad-b64", image={"base64": "%%% not base64"}),
        post("gone", image={"path": "img/missing.jpg"}),
        post("empty", text=None, image=None),  # no modality: dropped
        post("no-label", label="furious"),
        post("extra", colour="red"),  # not in the post schema
        "{truncated",
        "",
    ]
    path = tmp_path / "posts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    dataset = load_dataset(f"jsonl:{path}")
    samples = all_samples(dataset)
    assert sorted(samples) == ["b64", "bad-b64", "file-url", "gone", "path", "remote"]
    assert isinstance(samples["b64"].image, bytes) and samples["b64"].label_name == "negative"
    assert samples["path"].image == tmp_path / "img" / "a.jpg" and samples["path"].label_name == "neutral"
    assert load_image(samples["file-url"]) is not None
    assert samples["remote"].image is None and samples["gone"].image is None
    assert samples["b64"].meta == {"lang": "en"}
    report = dataset.report
    assert (report.rows, report.kept, report.rows_malformed, report.dropped_no_modality) == (10, 6, 3, 1)
    assert (report.images_remote, report.images_undecodable, report.images_missing) == (1, 1, 2)
    assert any(p.startswith("posts.jsonl:9: not a valid post") and "colour" in p for p in report.problems)


def test_jsonl_directory_holds_the_three_splits(tmp_path: Path) -> None:
    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.jsonl").write_text(post(f"{split}-1") + "\n")
    dataset = load_dataset(f"jsonl:{tmp_path}")
    assert {k: [s.id for s in v] for k, v in dataset.splits.items()} == {
        "train": ["train-1"],
        "dev": ["dev-1"],
        "test": ["test-1"],
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope:somewhere", "unknown data set kind"),
        ("mvsa-single", "needs a path"),
        ("jsonl:/no/such/file", "does not exist"),
    ],
)
def test_bad_specs_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(DataFormatError, match=message):
        load_dataset(spec)


# --- splits -----------------------------------------------------------------------------------------


@given(
    labels=st.lists(st.integers(0, 4), max_size=80),
    weights=st.lists(st.floats(0.05, 1.0), min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_stratified_split_sizes_are_exact_overall_and_close_per_label(
    labels: list[int], weights: list[float], seed: int
) -> None:
    samples = [Sample(str(i), "t", None, label, TUMEMO_LABELS) for i, label in enumerate(labels)]
    fractions = {f"s{k}": w for k, w in enumerate(weights)}
    splits = stratified_split(samples, fractions, seed)
    assert sorted(s.id for part in splits.values() for s in part) == sorted(s.id for s in samples)
    for name, share in fractions.items():
        assert abs(len(splits[name]) - len(samples) * share / sum(weights)) < 1
        for label in set(labels):
            expected = labels.count(label) * share / sum(weights)
            assert abs(sum(s.label == label for s in splits[name]) - expected) < 2
    assert splits == stratified_split(samples, fractions, seed)
