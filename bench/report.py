"""The project's performance targets, checked against the benchmark results of one run, and the plots for BENCHMARKS.md.

Reads ``<results>/<name>[.smoke].json``, prints one table (target, measured, met or not) and writes it to
``targets[.smoke].json``, and draws ``throughput[.smoke].png`` (posts/s against batch size: bare forward,
end to end, naive) and ``latency[.smoke].png`` (end-to-end latency by batch size, and the naive loop's
per-post service times). A target whose inputs are missing (a benchmark not run) is reported as such.

    python -m bench.report [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, print_table

E2E_OVER_FORWARD = 0.9
#: ``serve`` with a fresh install's settings against the fastest fp32 configuration (bench/defaults.py).
DEFAULTS_OVER_FASTEST = 0.9
#: Steady RSS while serving real photos.
STEADY_RSS_MIB = 800.0
HEAD_OVER_ENCODERS = 0.05
REDIS_ROUND_TRIPS = 1.0
#: The head-share target is about real encoders; the tiny test encoders are deliberately smaller than the head.
REAL_ENCODERS = ("offline", "paper")
#: "Flat": RSS after warm-up grows by less than this share of the steady RSS over the whole soak.
RSS_GROWTH_SHARE = 0.02


def load(out: Path, name: str, smoke: bool) -> dict[str, Any] | None:
    path = out / f"{name}{'.smoke' if smoke else ''}.json"
    return json.loads(path.read_text())["results"] if path.is_file() else None


def targets(results: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """One row per target and configuration/batch size: what was measured, against what, and whether it is met."""
    rows: list[dict[str, Any]] = []
    forward, e2e, naive, stages, soak = (
        results.get(n) for n in ("forward", "e2e", "naive", "stages", "soak")
    )
    if e2e:
        rows += _end_to_end_rows(forward, e2e, naive)
    else:
        rows.append(_missing("end to end / bare forward", "e2e"))
    rows.append(_defaults_row(results.get("defaults")))
    if forward:
        for r in forward["rows"]:
            if r["batch_size"] == 32 and r["config"] in REAL_ENCODERS:
                ratio = r["head_ms"]["median"] / r["encoders_ms"]["median"]
                rows.append(
                    _row(
                        f"DRF head / encoders (forward), {r['config']} batch 32",
                        ratio,
                        HEAD_OVER_ENCODERS,
                        "<=",
                    )
                )
    if stages:
        for run in stages["runs"]:
            if run["config"] in REAL_ENCODERS:
                label = f"DRF head / encoders (serve path), {run['config']} batch {run['batch']}"
                rows.append(_row(label, run["head_over_encoders"], HEAD_OVER_ENCODERS, "<="))
            trips = run["redis_round_trips_per_batch"]["max"]
            rows.append(
                _row(f"Redis round trips per batch (max), {run['config']}", trips, REDIS_ROUND_TRIPS, "<=")
            )
    else:
        rows.append(_missing("DRF head / encoders, Redis round trips", "stages"))
    for run in (soak, results.get("soak-cpu-torch")):
        if run:
            rows.append(
                _row(
                    f"steady RSS of serve, MiB (soak median; torch {run.get('serve_torch', 'of this venv')})",
                    run["steady_rss_mib"]["median"],
                    STEADY_RSS_MIB,
                    "<=",
                )
            )
    if not soak and e2e:
        rss = max(r["throughput"].get("rss_mib", float("nan")) for r in e2e["rows"])
        rows.append(_row("RSS of the end-to-end process after its backlogs, MiB", rss, STEADY_RSS_MIB, "<="))
    if soak:
        share = soak["rss_growth_mib"] / soak["steady_rss_mib"]["median"]
        label = (
            f"RSS growth after warm-up / steady RSS ({soak['duration_s'] / 60:.0f} min soak, "
            f"{soak['rss_slope_mib_per_min']:+.2f} MiB/min)"
        )
        rows.append(_row(label, share, RSS_GROWTH_SHARE, "<="))
    else:
        rows.append(_missing("RSS flat after warm-up", "soak"))
    return rows


def _end_to_end_rows(
    forward: dict[str, Any] | None, e2e: dict[str, Any], naive: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The target: ``serve`` end to end at its best batch size against the bare forward at its best. The bare
    forward is e2e's paired one (bench/e2e.py: the same posts, decoded beforehand, timed right after each
    throughput run in the same process); results without it fall back to bench.forward's separate run, whose posts
    all carry both modalities. Per batch size, against bench.forward and against the naive one-post loop the
    ratios are reported without a target: no CPU makes a batched service 8x its own one-post loop once that loop
    already runs the fast encoders."""
    config = e2e["config"]
    best = max((r["throughput"] for r in e2e["rows"]), key=lambda t: t["posts_per_s"])
    paired = {
        r["bare_forward"]["batch"]: r["bare_forward"]["posts_per_s"]
        for r in e2e["rows"]
        if "bare_forward" in r
    }
    bare = {
        r["batch_size"]: r["posts_per_s"] for r in (forward or {}).get("rows", []) if r["config"] == config
    }
    rows = []
    if paired:
        best_paired = max(paired.items(), key=lambda item: item[1])
        label = (
            f"end to end (batch {best['batch']}) / bare forward on the same posts (batch {best_paired[0]}), "
            f"{config}, best batch sizes"
        )
        rows.append(_row(label, best["posts_per_s"] / best_paired[1], E2E_OVER_FORWARD, ">="))
        for row in e2e["rows"]:
            batch = row["throughput"]["batch"]
            if batch in paired:
                ratio = row["throughput"]["posts_per_s"] / paired[batch]
                rows.append(
                    _report(f"end to end / bare forward on the same posts, {config} batch {batch}", ratio)
                )
    if bare:
        best_bare = max(bare.items(), key=lambda item: item[1])
        label = f"end to end (batch {best['batch']}) / bench.forward (batch {best_bare[0]}), {config}, best batch sizes"
        ratio = best["posts_per_s"] / best_bare[1]
        rows.append(_report(label, ratio) if paired else _row(label, ratio, E2E_OVER_FORWARD, ">="))
        for row in e2e["rows"]:
            batch = row["throughput"]["batch"]
            if batch in bare:
                ratio = row["throughput"]["posts_per_s"] / bare[batch]
                rows.append(_report(f"end to end / bench.forward, {config} batch {batch}", ratio))
    if not rows:
        return [_missing(f"end to end / bare forward, {config}", f"forward rows of {config}")]
    for run in (naive or {}).get("runs", []):
        if run["config"] == config:
            ratio = best["posts_per_s"] / run["posts_per_s"]
            rows.append(_report(f"end to end (batch {best['batch']}) / naive loop, {config}", ratio))
    return rows


def _defaults_row(defaults: dict[str, Any] | None) -> dict[str, Any]:
    """Default settings against the fastest of the fp32 configurations measured in the same run."""
    if not defaults:
        return _missing("serve with default settings / fastest fp32 configuration", "defaults")
    speed = {r["configuration"]: r["posts_per_s"] for r in defaults["rows"]}
    fastest = max(speed, key=lambda name: speed[name])
    label = f"serve with default settings / fastest fp32 ({fastest}), {defaults['config']} batch {defaults['batch']}"
    return _row(label, speed["default"] / speed[fastest], DEFAULTS_OVER_FASTEST, ">=")


def _report(target: str, measured: float) -> dict[str, Any]:
    """A figure reported beside the targets, with no bound of its own."""
    return {"target": target, "measured": measured, "bound": "reported", "met": None}


def _row(target: str, measured: float, bound: float, op: str) -> dict[str, Any]:
    met = measured >= bound if op == ">=" else measured <= bound
    return {"target": target, "measured": measured, "bound": f"{op} {bound:g}", "met": met}


def _missing(target: str, needs: str) -> dict[str, Any]:
    return {"target": target, "measured": None, "bound": f"needs {needs}", "met": None}


def plot_throughput(results: dict[str, dict[str, Any] | None], path: Path) -> bool:
    forward, e2e, naive = results.get("forward"), results.get("e2e"), results.get("naive")
    if not (forward or e2e):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if forward:
        for config in sorted({r["config"] for r in forward["rows"]}):
            rows = [r for r in forward["rows"] if r["config"] == config]
            ax.plot(
                [r["batch_size"] for r in rows],
                [r["posts_per_s"] for r in rows],
                "o-",
                label=f"bare forward, {config}",
            )
    if e2e:
        rows = [r["throughput"] for r in e2e["rows"]]
        ax.plot(
            [r["batch"] for r in rows],
            [r["posts_per_s"] for r in rows],
            "s-",
            label=f"serve end to end, {e2e['config']}",
        )
    if naive:
        for run in naive["runs"]:
            ax.axhline(run["posts_per_s"], linestyle=":", color="grey")
            ax.annotate(f"naive loop, {run['config']}", (1, run["posts_per_s"]), fontsize=8, va="bottom")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (posts)")
    ax.set_ylabel("posts / s")
    ax.set_title("Throughput against batch size (2-core shared CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_latency(results: dict[str, dict[str, Any] | None], path: Path) -> bool:
    e2e, naive = results.get("e2e"), results.get("naive")
    if not (e2e or naive):
        return False
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if e2e:
        rows = [r["latency"] for r in e2e["rows"] if r["latency"]["latency_p50_s"] is not None]
        batches = [str(r["batch"]) for r in rows]
        for key, marker in (("latency_p50_s", "o"), ("latency_p99_s", "^"), ("latency_max_s", "x")):
            left.plot(batches, [r[key] * 1000 for r in rows], marker, label=key.split("_")[1])
        left.set_xlabel("batch size (max_posts)")
        left.set_ylabel("created_at → published, ms")
        left.set_title(f"serve, paced at half its throughput ({e2e['config']})", fontsize=9)
        left.legend(fontsize=8)
    if naive:
        for run in naive["runs"]:
            samples = sorted(run.get("service_times_ms", []))
            if samples:
                right.plot(
                    samples, [(i + 1) / len(samples) for i in range(len(samples))], label=run["config"]
                )
        right.set_xscale("log")
        right.set_xlabel("poll → commit per post, ms")
        right.set_ylabel("cumulative share of posts")
        right.set_title("naive loop: service time per post", fontsize=9)
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def report(out: Path, smoke: bool) -> list[dict[str, Any]]:
    suffix = ".smoke" if smoke else ""
    names = ("forward", "e2e", "naive", "stages", "soak", "defaults")
    results = {name: load(out, name, smoke) for name in names}
    results["soak-cpu-torch"] = load(out / "cpu-torch", "soak", smoke)
    rows = targets(results)
    print_table(
        "Targets (ratios measured in this run, on this machine)",
        ["target", "measured", "bound", "met"],
        [
            [
                r["target"],
                "-" if r["measured"] is None else r["measured"],
                r["bound"],
                "-" if r["bound"] == "reported" else {True: "yes", False: "NO", None: "not run"}[r["met"]],
            ]
            for r in rows
        ],
    )
    (out / f"targets{suffix}.json").write_text(json.dumps(rows, indent=2) + "\n")
    plots = ((f"throughput{suffix}.png", plot_throughput), (f"latency{suffix}.png", plot_latency))
    drawn = [name for name, draw in plots if draw(results, out / name)]
    print(f"wrote {out / f'targets{suffix}.json'}; plots: {', '.join(drawn) or 'none (no results to draw)'}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="read the smoke results")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    report(args.out, args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
