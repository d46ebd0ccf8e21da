"""``scripts/gpu-check --dry-run``: the GPU check's every step (services, the gpu tests, the GPU benchmarks,
the result folder) on CPU with tiny sizes, so the script works when a session finally has a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.services]


def test_gpu_check_dry_run_runs_every_step_and_writes_one_result_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTSENSE_GPU")}
    env["POSTSENSE_GPU_CHECK_WORK"] = str(tmp_path / "work")
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check"), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    for step in ("services exit=0", "tests exit=0", "bench exit=0"):
        assert step in log, log[-4000:]

    files = {p.name for p in out.iterdir()}
    assert {"gpu-check.log", "bench.log", "pytest.xml", "gpu.smoke.json", "gpu-check-results.tar.gz"} <= files
    assert len(files) <= 8  # what a device call brings back
    suite = ET.parse(out / "pytest.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0" and suite.get("errors") == "0"
    assert int(suite.get("tests", "0")) - int(suite.get("skipped", "0")) >= 6  # the gpu tests ran, on CPU

    verdict = json.loads((out / "gpu.smoke.json").read_text())["results"]["verdicts"]["tiny"]
    assert verdict["serve_vs_forward"] and verdict["serve_vs_naive"] > 0
    with tarfile.open(out / "gpu-check-results.tar.gz") as archive:
        names = archive.getnames()
    assert any(n.endswith("tiny/stages.smoke.json") for n in names)
    assert not any(Path(n).name == "broker.json" for n in names)  # services stopped: no PID records left
