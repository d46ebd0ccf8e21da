"""`postsense score` end to end on real files: JSONL and photo directories in, sentiment records and rejects out,
every input line accounted for, resumable after an interruption, and a shadow comparison with a second model."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sklearn.datasets
import torch
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
    (posts / "p4.txt").write_bytes(b"\xff\xfe not utf-8")
    (posts / "p5.jpg").write_bytes(b"not really a jpeg")
    (posts / "notes.md").write_text("ignored: neither an image nor a text")
    out = tmp_path / "out.jsonl"
    cmd = postsense(checkpoints[0], "score", str(posts), "--out", str(out))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    by_id = {r["id"]: r for r in read_jsonl(out)}
    [rejected] = read_jsonl(tmp_path / "out.jsonl.rejected.jsonl")

    assert summary["posts_in"] == 5 == summary["scored"] + summary["rejected"]
    assert set(by_id) == {"p1", "p2", "p3", "p5"} and rejected["reason"] == "not_utf8"
    assert rejected["source"]["topic"] == str((posts / "p4.txt").resolve())
    assert by_id["p1"]["source"]["topic"] == str((posts / "p1.txt").resolve())
    assert [by_id["p1"]["modalities"][m]["state"] for m in ("image", "text")] == ["ok", "ok"]
    assert (by_id["p2"]["modalities"]["text"]["state"], by_id["p2"]["recovered"]) == ("missing", "text")
    assert by_id["p3"]["modalities"]["image"]["state"] == "missing"
    assert by_id["p5"]["modalities"]["image"]["state"] == "undecodable"
    for record in by_id.values():
        assert not list(validator("sentiment").iter_errors(record))


def test_score_refuses_a_missing_input_with_a_clear_error(
    tmp_path: Path, checkpoints: tuple[Path, Path]
) -> None:
    cmd = postsense(
        checkpoints[0], "score", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out.jsonl")
    )
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no such input" in result.stderr
