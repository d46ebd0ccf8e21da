"""The benchmark suite keeps running (``python -m bench --smoke``), and what it reports means what it says.

No timing is asserted here: the smoke run only proves every benchmark still runs end to end against the real
broker and Redis and writes complete results; the other tests check the pieces the reported figures rest on
(the workload's mix, the statistics, the target verdicts) on hand-made inputs.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.common import Workload, make_posts, percentile, spread
from bench.report import targets
from connectors.media import FetchPolicy, MediaLimits, decode_image_field
from core.contracts import Invalid, ModalityState, parse_post

ROOT = Path(__file__).resolve().parents[2]
PROVENANCE = {"benchmark", "smoke", "finished_at", "command", "machine", "versions", "results"}


@pytest.mark.slow
@pytest.mark.services
def test_smoke_suite_runs_every_benchmark_and_writes_results(services, tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--out",
            str(tmp_path),
            "--bootstrap",
            services.bootstrap,
            "--redis-url",
            services.redis_url,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = {}
    for name in ("forward", "levers", "queues", "stages", "naive", "e2e", "soak", "defaults"):
        document = json.loads((tmp_path / f"{name}.smoke.json").read_text())
        assert PROVENANCE <= set(document), name
        assert document["smoke"] is True and document["machine"]["cpus_usable"] >= 1
        assert "torch" in document["versions"]
        results[name] = document["results"]
    # What each benchmark reports is there and plausible.
    assert all(r["posts_per_s"] > 0 for r in results["forward"]["rows"])
    assert {r["lever"] for r in results["levers"]["rows"]} >= {"image encoder", "text encoder", "decode"}
    onnx = [r for r in results["levers"]["rows"] if r["variant"].startswith("ONNX Runtime")]
    assert onnx and all(r["max_abs_diff"] < 1e-3 for r in onnx)  # the kept lever changes no output
    (stage_run,) = results["stages"]["runs"]
    assert {s["stage"] for s in stage_run["stages"]} >= {
        "poll",
        "image_encoder",
        "head",
        "redis",
        "produce",
        "commit",
    }
    assert (
        stage_run["redis_round_trips_per_batch"]["max"] == 1
    )  # one EVALSHA per batch, counted at the socket
    (naive,) = results["naive"]["runs"]
    assert naive["posts_per_s"] > 0 and len(naive["service_times_ms"]) == naive["measured_posts"]
    assert all(row["throughput"]["complete"] for row in results["e2e"]["rows"])
    # Default settings measured beside eager torch (tiny encoders: no ONNX Runtime configuration to compare).
    assert {r["configuration"] for r in results["defaults"]["rows"]} == {"default", "checkpoint"}
    assert all(r["complete"] and r["posts_per_s"] > 0 for r in results["defaults"]["rows"])
    soak = results["soak"]
    assert soak["exit_code"] == 0  # serve drained and stopped cleanly on SIGTERM after the run
    assert soak["peak_rss_mib"] >= soak["steady_rss_mib"]["median"] > 50
    assert soak["published_total"] > 0
    # The same soak served by CPU-only torch (the cpu image's), where this machine has that wheel.
    cpu_soak = tmp_path / "cpu-torch" / "soak.smoke.json"
    if glob.glob("/opt/wheels/torch-*+cpu-*.whl"):
        cpu = json.loads(cpu_soak.read_text())["results"]
        assert cpu["exit_code"] == 0 and cpu["published_total"] > 0
        assert cpu["serve_torch"].endswith("+cpu") and "CUDA" not in cpu["serve_torch"]
    else:
        assert "soak-cpu-torch skipped" in done.stdout and not cpu_soak.exists()
    # The runner's verdicts and plots.
    verdicts = json.loads((tmp_path / "targets.smoke.json").read_text())
    assert any(v["target"].startswith("Redis round trips") and v["met"] for v in verdicts)
    for png in ("throughput.smoke.png", "latency.smoke.png", "soak_rss.smoke.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_workload_has_the_stated_mix_of_posts() -> None:
    workload = Workload()
    records = make_posts(600, seed=7, workload=workload, distinct_images=8)
    states: dict[str, int] = {}
    sizes = []
    invalid = missing_text = 0
    for raw in records:
        post = parse_post(raw)
        if isinstance(post, Invalid):
            invalid += 1
            continue
        missing_text += post.text is None
        decoded = decode_image_field(post.image, MediaLimits(), FetchPolicy())
        states[decoded.state.value] = states.get(decoded.state.value, 0) + 1
        if decoded.state is ModalityState.ok:
            sizes.append(len(base64.b64decode(post.image["base64"])))  # type: ignore[index]
    valid = len(records) - invalid
    assert invalid / len(records) == pytest.approx(workload.invalid, abs=0.015)
    assert states["missing"] / valid == pytest.approx(workload.missing_image, abs=0.04)
    assert states["undecodable"] / valid == pytest.approx(workload.corrupt_image, abs=0.025)
    assert missing_text / valid == pytest.approx(workload.missing_text, abs=0.025)
    assert all(
        0.8 * workload.image_bytes <= n <= 1.2 * workload.image_bytes for n in sizes
    )  # "~50 KB photos"
    assert make_posts(50, seed=7, distinct_images=8) == records[:50]  # seeded: runs are comparable


def test_spread_and_percentile_agree_with_numpy() -> None:
    samples = [12.0, 3.0, 7.5, 9.0, 100.0, 4.0]
    s = spread(samples)
    assert (s.median, s.min, s.max, s.n) == (8.25, 3.0, 100.0, 6)
    assert s.p25 == pytest.approx(np.percentile(samples, 25)) and s.p75 == pytest.approx(
        np.percentile(samples, 75)
    )
    assert percentile(samples, 99) == pytest.approx(np.percentile(samples, 99))
    with pytest.raises(ValueError, match="no samples"):
        spread([])


def test_targets_are_judged_against_the_project_bounds() -> None:
    forward = {
        "rows": [
            {
                "config": "offline",
                "batch_size": 32,
                "posts_per_s": 40.0,
                "head_ms": {"median": 3.0},
                "encoders_ms": {"median": 100.0},
            },
            {
                "config": "offline",
                "batch_size": 8,
                "posts_per_s": 30.0,
                "head_ms": {"median": 1.0},
                "encoders_ms": {"median": 10.0},
            },
        ]
    }
    e2e = {
        "config": "offline",
        "rows": [
            {
                "throughput": {"batch": 32, "posts_per_s": 36.0}
            },  # best: 0.9 of the best bare forward (40/s): met
            {"throughput": {"batch": 8, "posts_per_s": 24.0}},  # 0.8 of its own batch size: reported only
        ],
    }
    naive = {"runs": [{"config": "offline", "posts_per_s": 5.0}]}  # best e2e 36/s = 7.2x: reported only
    stages = {
        "runs": [
            {
                "config": "offline",
                "batch": 32,
                "head_over_encoders": 0.02,
                "redis_round_trips_per_batch": {"max": 2.0},
            }
        ]
    }
    soak = {
        "duration_s": 660,
        "rss_slope_mib_per_min": 0.1,
        "rss_growth_mib": 5.0,
        "steady_rss_mib": {"median": 1000.0},
        "serve_torch": "2.14.1 (CUDA 13.0)",
    }
    cpu_soak = {**soak, "steady_rss_mib": {"median": 600.0}, "serve_torch": "2.13.0+cpu"}
    results = {"forward": forward, "e2e": e2e, "naive": naive, "stages": stages, "soak": soak}
    verdicts = {r["target"]: r["met"] for r in targets({**results, "soak-cpu-torch": cpu_soak})}
    best = "end to end (batch 32) / bench.forward (batch 32), offline, best batch sizes"
    assert verdicts[best] is True
    assert verdicts["end to end / bench.forward, offline batch 8"] is None  # reported, no target of its own
    assert verdicts["end to end (batch 32) / naive loop, offline"] is None
    slower = {**e2e, "rows": [{"throughput": {"batch": 8, "posts_per_s": 35.0}}]}  # 35/40 < 0.9 at best sizes
    worse = targets({**results, "e2e": slower})
    assert next(r["met"] for r in worse if "best batch sizes" in r["target"]) is False
    assert verdicts["DRF head / encoders (forward), offline batch 32"] is True  # 3 %
    assert verdicts["DRF head / encoders (serve path), offline batch 32"] is True
    assert verdicts["Redis round trips per batch (max), offline"] is False
    assert next(v for t, v in verdicts.items() if t.startswith("RSS growth")) is True  # 0.5 % of steady RSS
    # One steady-RSS row per torch build that served: the CUDA build's 1000 MiB misses, CPU-only torch's 600 meets.
    assert verdicts["steady RSS of serve, MiB (soak median; torch 2.14.1 (CUDA 13.0))"] is False
    assert verdicts["steady RSS of serve, MiB (soak median; torch 2.13.0+cpu)"] is True


def test_the_paired_bare_forward_on_the_same_posts_is_the_target_when_measured() -> None:
    """bench.e2e's paired bare forward (same posts, same process) decides; bench.forward's is reported beside."""
    forward = {"rows": [{"config": "offline", "batch_size": 16, "posts_per_s": 50.0}]}
    rows = [
        {
            "throughput": {"batch": 32, "posts_per_s": 37.0},
            "bare_forward": {"batch": 32, "posts_per_s": 40.0},
        },
        {
            "throughput": {"batch": 8, "posts_per_s": 30.0},
            "bare_forward": {"batch": 8, "posts_per_s": 42.0},  # the best bare batch: 37/42 = 0.88
        },
    ]
    verdicts = {
        r["target"]: r["met"]
        for r in targets({"forward": forward, "e2e": {"config": "offline", "rows": rows}})
    }
    paired = "end to end (batch 32) / bare forward on the same posts (batch 8), offline, best batch sizes"
    assert verdicts[paired] is False
    assert verdicts["end to end / bare forward on the same posts, offline batch 32"] is None
    assert verdicts["end to end (batch 32) / bench.forward (batch 16), offline, best batch sizes"] is None
    rows[1]["bare_forward"]["posts_per_s"] = 41.0  # 37/41 = 0.902
    met = targets({"forward": None, "e2e": {"config": "offline", "rows": rows}})
    assert next(r["met"] for r in met if r["target"].startswith("end to end (batch 32) / bare")) is True


def test_targets_say_what_was_not_run() -> None:
    rows = targets(
        {"forward": None, "e2e": None, "naive": None, "stages": None, "soak": None, "defaults": None}
    )
    assert rows and all(r["met"] is None and r["bound"].startswith("needs ") for r in rows)
