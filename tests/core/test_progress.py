"""Progress off a terminal: a few log lines per bar (one per interval and a final one), not one per step."""

from __future__ import annotations

import io
import logging

import tqdm.std

from core.progress import progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_bar_logs_once_per_interval_not_once_per_step(caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="postsense.progress")
    now = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])  # the bar's clock: 1.25 ms of work per step
    sink = io.StringIO()  # a file or pipe: not a terminal
    with progress(total=400, desc="encode", unit="img", interval_s=0.1, file=sink) as bar:
        for _ in range(400):
            now[0] += 0.00125
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "postsense.progress"]
    assert 2 <= len(lines) <= 12, lines  # 0.5 s of work at one line per 0.1 s, plus the first and the last
    assert all("\r" not in line for line in lines) and sink.getvalue() == ""
    assert "400/400" in lines[-1] and "img/s" in lines[-1]


def test_on_a_terminal_the_bar_is_tqdm_on_that_terminal(caplog) -> None:
    tty = Tty()
    for _ in progress(range(50), desc="train", file=tty):
        pass
    assert "50/50" in tty.getvalue() and "\r" in tty.getvalue()
    assert not [r for r in caplog.records if r.name == "postsense.progress"]


def test_building_the_demo_set_reports_progress_instead_of_staying_silent(
    tmp_path, caplog, monkeypatch
) -> None:
    import shutil
    import sys
    from pathlib import Path

    from core.data.vader import SDIST_NAME, build_demo_set

    cached = Path(__file__).resolve().parents[2] / "data" / "cache" / SDIST_NAME
    if cached.is_file():  # skip the pip download when a local build already fetched the archive
        (tmp_path / "cache").mkdir()
        shutil.copy(cached, tmp_path / "cache" / SDIST_NAME)
    monkeypatch.setattr(
        sys, "stderr", io.StringIO()
    )  # as under `make demo > log`, even when pytest runs with -s
    caplog.set_level(logging.INFO)
    build_demo_set(tmp_path, limit=30)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("building the demo set") for m in messages)
    assert any("build demo set: render images" in m and "30/30" in m for m in messages), messages
