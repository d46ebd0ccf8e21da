"""`postsense score` end to end on real files: JSONL and photo directories in, sentiment records and rejects out,
every input line accounted for, resumable after an interruption, and a shadow comparison with a second model."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sklearn.datasets
import torch
from helpers import strict_json, strict_json_lines
from images import png_base64
from stream_support import LABELS

from core.checkpoint import save_checkpoint
from core.contracts import validator
from core.inference import Predictor
from core.model import create_model
from stream.offline import score
from stream.settings import load_settings

PHOTOS = Path(sklearn.datasets.__file__).parent / "images"  # china.jpg, flower.jpg: real JPEG photos


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("models")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = directory / f"tiny-{seed}.pt"
        save_checkpoint(create_model("tiny", labels=LABELS), path)
        paths.append(path)
    return paths[0], paths[1]


def write_jsonl(path: Path) -> list[bytes]:
    photo = base64.b64encode((PHOTOS / "flower.jpg").read_bytes()).decode()
    lines = [
        json.dumps(
            {
                "id": "a",
                "text": "what a lovely day",
                "image": {"base64": photo},
                "created_at": "2026-11-23T12:00:00Z",
            }
        ).encode(),
        b"this line is not JSON",
        json.dumps({"id": "b", "text": "grey and rainy", "image": {"base64": png_base64()}}).encode(),
        json.dumps({"id": "c", "text": "bad date", "created_at": "yesterday"}).encode(),
        json.dumps({"id": "d", "image": {"path": "china.jpg"}}).encode(),  # relative: read next to the file
        json.dumps({"id": "e", "text": "x" * 20_000}).encode(),  # truncated at limits.max_text_chars
        json.dumps({"text": "no id"}).encode(),
        b"",  # a blank line is not a post either: rejected, not skipped silently
    ]
    for i in range(12):
        lines.append(json.dumps({"id": f"n{i}", "text": f"post number {i}"}).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    shutil.copy(PHOTOS / "china.jpg", path.parent / "china.jpg")
    return lines


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def postsense(checkpoint: Path, *args: str) -> list[str]:
    """The ``postsense`` command line with the model's checkpoint as a global flag."""
    return [sys.executable, "-m", "stream", "--checkpoint", str(checkpoint), *args]


def test_score_a_jsonl_file_end_to_end(tmp_path: Path, checkpoints: tuple[Path, Path]) -> None:
    lines = write_jsonl(tmp_path / "posts.jsonl")
    out = tmp_path / "out.jsonl"
    cmd = postsense(
        checkpoints[0],
        "--set",
        "batch.max_posts=4",
        "score",
        str(tmp_path / "posts.jsonl"),
        "--out",
        str(out),
        "--compare",
        str(checkpoints[1]),
    )
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    records = read_jsonl(out)
    rejected = read_jsonl(tmp_path / "out.jsonl.rejected.jsonl")

    assert summary["posts_in"] == len(lines) == summary["scored"] + summary["rejected"]
    assert (summary["scored"], summary["rejected"]) == (len(records), len(rejected)) == (16, 4)
    assert summary["rejected_reasons"] == {"not_json": 2, "schema_invalid": 2}
    assert json.loads((tmp_path / "out.jsonl.summary.json").read_text())["posts_in"] == len(lines)
    assert summary["posts_per_s"] > 0

    source = str((tmp_path / "posts.jsonl").resolve())
    by_id = {r["id"]: r for r in records}
    for record in records:
        assert not list(validator("sentiment").iter_errors(record)), record["id"]
        assert record["source"]["topic"] == source and record["source"]["partition"] == 0
        line = lines[record["source"]["offset"] - 1]  # offset = line number from 1
        assert json.loads(line)["id"] == record["id"]
        assert record["shadow"]["agrees"] == (record["shadow"]["label"] == record["label"])
    assert by_id["a"]["modalities"]["image"]["state"] == "ok"  # a real photo, decoded
    assert by_id["d"]["modalities"]["image"]["state"] == "ok" and by_id["d"]["recovered"] == "text"
    assert by_id["e"]["text_truncated"] and not by_id["a"]["text_truncated"]
    assert summary["compared"] == 16 and summary["agreed"] == sum(r["shadow"]["agrees"] for r in records)
    assert {(r["source"]["offset"], r["reason"]) for r in rejected} == {
        (2, "not_json"),
        (4, "schema_invalid"),
        (7, "schema_invalid"),
        (8, "not_json"),
    }
    assert next(r for r in rejected if r["source"]["offset"] == 2)["value"] == "this line is not JSON"


def test_an_interrupted_run_resumes_without_redoing_finished_lines(
    tmp_path: Path, checkpoints: tuple[Path, Path]
):
    lines = write_jsonl(tmp_path / "posts.jsonl")
    settings = load_settings(None, {})
    settings = settings.model_copy(
        update={"media": settings.media.model_copy(update={"local_root": tmp_path})}
    )
    predictor = Predictor.from_checkpoint(checkpoints[0], "cpu")
    out = tmp_path / "out.jsonl"
    score(tmp_path / "posts.jsonl", out, settings, predictor, batch_size=4)
    complete = out.read_text().splitlines()
    # As if killed mid-write: the first five records on disk and half of the sixth; every reject already written.
    out.write_text("\n".join(complete[:5]) + "\n" + complete[5][:40])

    summary = score(tmp_path / "posts.jsonl", out, settings, predictor, batch_size=4)

    records = read_jsonl(out)
    assert sorted(r["source"]["offset"] for r in records) == sorted(
        json.loads(c)["source"]["offset"] for c in complete
    )
    assert summary.skipped_done == 5 + 4 and summary.scored == len(complete) - 5 and summary.rejected == 0
    assert summary.posts_in == len(lines) == summary.scored + summary.rejected + summary.skipped_done
    assert len(read_jsonl(tmp_path / "out.jsonl.rejected.jsonl")) == 4


def test_score_a_directory_of_photo_and_text_pairs(tmp_path: Path, checkpoints: tuple[Path, Path]) -> None:
    posts = tmp_path / "posts"
    posts.mkdir()
    shutil.copy(PHOTOS / "flower.jpg", posts / "p1.jpg")
    (posts / "p1.txt").write_text("flowers in the garden, so happy")
    shutil.copy(PHOTOS / "china.jpg", posts / "p2.jpg")  # no text: recovered from the image
    (posts / "p3.txt").write_text("just words")
    (posts / "p4.txt").write_bytes("café au lait, s'il vous plaît".encode("cp1252"))  # not UTF-8
    (posts / "p5.jpg").write_bytes(b"not really a jpeg")
    (posts / "p6.txt").write_bytes("你好，世界".encode("gbk"))  # not UTF-8 either
    shutil.copy(PHOTOS / "flower.jpg", posts / "p7.jpg")
    (posts / "p7.txt").write_bytes(b"\x81\x8d\x90 in no known encoding")  # not UTF-8, GBK or cp1252
    (posts / "notes.md").write_text("ignored: neither an image nor a text")
    out = tmp_path / "out.jsonl"
    cmd = postsense(checkpoints[0], "score", str(posts), "--out", str(out))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    by_id = {r["id"]: r for r in read_jsonl(out)}

    assert summary["posts_in"] == 7 == summary["scored"] and summary["rejected"] == 0
    assert read_jsonl(tmp_path / "out.jsonl.rejected.jsonl") == []
    assert (summary["texts_repaired"], summary["texts_undecodable"]) == (2, 1)  # p4, p6; p7
    assert set(by_id) == {"p1", "p2", "p3", "p4", "p5", "p6", "p7"}
    assert by_id["p1"]["source"]["topic"] == str((posts / "p1.txt").resolve())
    assert [by_id["p1"]["modalities"][m]["state"] for m in ("image", "text")] == ["ok", "ok"]
    assert (by_id["p2"]["modalities"]["text"]["state"], by_id["p2"]["recovered"]) == ("missing", "text")
    assert by_id["p3"]["modalities"]["image"]["state"] == "missing"
    assert by_id["p4"]["modalities"]["text"]["state"] == by_id["p6"]["modalities"]["text"]["state"] == "ok"
    assert by_id["p5"]["modalities"]["image"]["state"] == "undecodable"
    # A text in no known encoding is an undecodable modality, not a rejected post: scored on its image.
    assert by_id["p7"]["modalities"]["text"] == {
        "state": "undecodable",
        "reason": "unknown_encoding",
        "quality": None,
    }
    assert by_id["p7"]["modalities"]["image"]["state"] == "ok"
    assert by_id["p7"]["label"] in LABELS and by_id["p7"]["recovered"] == "text"
    for record in by_id.values():
        assert not list(validator("sentiment").iter_errors(record))


class TextSpy:
    """A real predictor that records every text the decode path hands it."""

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner
        self.texts: list[str] = []

    def normalise_text(self, text: str) -> str | None:
        self.texts.append(text)
        return self.inner.normalise_text(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_directory_s_texts_are_decoded_as_the_data_set_readers_decode_tweets(
    tmp_path: Path, checkpoints: tuple[Path, Path]
) -> None:
    texts = {
        "utf8": "Smiles 😀 all round",
        "bom": "\ufeffwith a byte-order mark",
        "cp1252": "“Hi” from the café",
        "gbk": "你好，世界",
    }
    posts = tmp_path / "posts"
    posts.mkdir()
    for name, text in texts.items():
        encoding = {"utf8": "utf-8", "bom": "utf-8"}.get(name, name)
        (posts / f"{name}.txt").write_bytes(text.encode(encoding))
    spy = TextSpy(Predictor.from_checkpoint(checkpoints[0], "cpu"))

    summary = score(posts, tmp_path / "out.jsonl", load_settings(None, {}), spy)  # type: ignore[arg-type]

    assert sorted(spy.texts) == sorted({**texts, "bom": "with a byte-order mark"}.values())
    assert (summary.scored, summary.rejected, summary.texts_repaired, summary.texts_undecodable) == (
        4,
        0,
        2,
        0,
    )


#: Node's JSON.parse over each file (JSONL line by line, a .json file whole); prints how many documents each held.
NODE_PARSE = """
const fs = require("fs");
for (const file of process.argv.slice(1)) {
  const text = fs.readFileSync(file, "utf8");
  const docs = file.endsWith(".jsonl") ? text.split("\\n").filter((line) => line) : [text];
  docs.forEach((doc) => JSON.parse(doc));
  console.log(docs.length);
}
"""


def test_non_finite_numbers_are_rejected_and_every_record_written_is_strict_json(
    tmp_path: Path, checkpoints: tuple[Path, Path]
) -> None:
    lines = write_jsonl(tmp_path / "posts.jsonl")
    refused = {
        "nan": b'{"id": "nan", "text": "t", "metadata": {"score": NaN}}',
        "inf": b'{"id": "inf", "text": "t", "metadata": {"scores": [1, Infinity]}}',
        "minus-inf": b'{"id": "minus-inf", "text": "t", "metadata": {"a": {"b": -Infinity}}}',
        "big": b'{"id": "big", "text": "t", "metadata": {"views": 1e400}}',  # Python reads it as inf
    }
    with open(tmp_path / "posts.jsonl", "ab") as fh:
        fh.write(b"\n".join(refused.values()) + b"\n")
    out = tmp_path / "out.jsonl"
    cmd = postsense(checkpoints[0], "score", str(tmp_path / "posts.jsonl"), "--out", str(out))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr

    # Every record the run wrote parses with a strict parser (no bare NaN / Infinity tokens anywhere).
    summary = strict_json(result.stdout.strip().splitlines()[-1])
    assert strict_json((tmp_path / "out.jsonl.summary.json").read_text()) == summary
    records = strict_json_lines(out)
    rejected = strict_json_lines(tmp_path / "out.jsonl.rejected.jsonl")
    assert len(records) == summary["scored"] == 16 and len(rejected) == summary["rejected"] == 4 + len(
        refused
    )
    for record in records:
        assert not list(validator("sentiment").iter_errors(record)), record["id"]
    assert summary["rejected_reasons"]["non_finite_number"] == len(refused)
    node = shutil.which("node")
    if node is not None:  # a second, independent strict parser, where one is installed
        written = [out, tmp_path / "out.jsonl.rejected.jsonl", tmp_path / "out.jsonl.summary.json"]
        parsed = subprocess.run([node, "-e", NODE_PARSE, *map(str, written)], capture_output=True, text=True)
        assert parsed.returncode == 0, parsed.stderr
        assert parsed.stdout.split() == [str(len(records)), str(len(rejected)), "1"]
    by_offset = {r["source"]["offset"]: r for r in rejected}
    for offset, (name, value) in enumerate(refused.items(), start=len(lines) + 1):
        assert by_offset[offset]["reason"] == "non_finite_number", name
        assert by_offset[offset]["value"] == value.decode()  # the original line, untouched
        assert not list(
            validator("dead_letter").iter_errors({k: v for k, v in by_offset[offset].items() if k != "value"})
        )


def test_score_refuses_a_missing_input_with_a_clear_error(
    tmp_path: Path, checkpoints: tuple[Path, Path]
) -> None:
    cmd = postsense(
        checkpoints[0], "score", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out.jsonl")
    )
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no such input" in result.stderr
