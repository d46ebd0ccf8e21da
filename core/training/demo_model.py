"""The demo's model: a DRF head trained on part of the VADER demo set on first use, reused afterwards."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from core.checkpoint import save_checkpoint
from core.data.records import Sample, stratified_split
from core.data.vader import load_vader
from core.encoders.__main__ import prepare_cpu_serving
from core.encoders.configs import training_options
from core.model.drf_model import create_model
from core.provenance import training_record
from core.training.features import CachedSource, encode_samples, feature_cache_for
from core.training.loop import CPU_DIM, CPU_QUEUE_SIZE, CPU_TRAIN, calibrate_temperature, fit, one_thread
from core.training.mixing import PRODUCT_INTACT, damage_mix

log = logging.getLogger(__name__)

#: Training and dev posts of the demo model (cold cache: a few minutes on 2 cores).
DEMO_TRAIN_SAMPLES = 1200
DEMO_DEV_SAMPLES = 300


def _stratified_subset(samples: Sequence[Sample], size: int) -> list[Sample]:
    """``size`` samples with the label proportions of ``samples`` (all of them if there are fewer)."""
    if len(samples) <= size:
        return list(samples)
    return stratified_split(samples, {"keep": size, "rest": len(samples) - size}, seed=0)["keep"]


def ensure_demo_model(data_dir: str | Path, out_path: str | Path, progress: bool = True) -> Path:
    """The demo's checkpoint: reused when ``out_path`` exists, else trained on part of the VADER demo set.

    Offline encoders, frozen, with features cached under ``data_dir/features`` (shared with ``postsense evaluate``,
    so after an evaluation this only trains the head).
    """
    out = Path(out_path)
    if out.is_file():
        return out
    dataset = load_vader(data_dir)
    torch.manual_seed(0)
    model = create_model(
        "offline",
        dataset.label_names,
        dim=CPU_DIM,
        queue_size=CPU_QUEUE_SIZE,
        encoder_options=training_options("offline"),
    )
    cache = feature_cache_for(model, Path(data_dir) / "features")
    splits = {
        "train": _stratified_subset(dataset["train"], DEMO_TRAIN_SAMPLES),
        "dev": _stratified_subset(dataset["dev"], DEMO_DEV_SAMPLES),
    }
    # The product regime, as `postsense train` by default: each post intact or under one of its damaged variants.
    train, dev = (
        damage_mix(
            model,
            splits[s],
            encode_samples(model, splits[s], cache, progress=progress),
            cache,
            progress=progress,
        )
        for s in ("train", "dev")
    )
    dev_draw = CachedSource(dev.fixed())
    config = replace(CPU_TRAIN, batch_size=32, epochs=10)
    with one_thread():
        result = fit(model, train, dev_draw, config, progress=progress, description="demo model")
        temperature = calibrate_temperature(model, dev_draw)  # temperature scaling on dev
    log.info(
        "demo model: best dev accuracy %.1f%% at epoch %d, calibration temperature %.3f",
        result.best_dev_accuracy,
        result.best_epoch,
        temperature,
    )
    # Said at every serve and score start: a demo model, and how to train on one's own posts (core.provenance).
    record = training_record(
        f"vader:{data_dir}",
        splits,
        result.best_dev_accuracy,
        regime={"regime": "product", "intact": PRODUCT_INTACT, "seed": 0},
    )
    save_checkpoint(model, out, training=record)
    prepare_cpu_serving(out)
    return out
