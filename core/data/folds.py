"""Stratified cross-validation folds over every post of a data set, seeded.

``stratified_folds`` deals each label's posts, in a seeded random order, round-robin into K folds, so the folds
are disjoint, cover every post, and each holds its share of every label (sizes differ by at most one per label).
``fold_split`` makes fold k the test set, a stratified slice of the rest the dev set (model selection only;
``DEV_FRACTION`` of the rest, about the published MVSA-Single dev share) and the remainder the training set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.data.records import Dataset, Sample, stratified_split

#: Share of the non-test posts that goes to dev: the published MVSA-Single split has 451 dev posts of 4,061 (11.1 %).
DEV_FRACTION = 0.11


def pooled(dataset: Dataset) -> list[Sample]:
    """Every post of every split, in split order (the folds are drawn over these)."""
    return [sample for split in dataset.splits.values() for sample in split]


def stratified_folds(labels: Sequence[int], k: int, seed: int) -> list[list[int]]:
    """K disjoint lists of indices into ``labels`` covering all of them, each stratified by label."""
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    if len(labels) < k:
        raise ValueError(f"{len(labels)} posts cannot fill {k} folds")
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        for position, index in enumerate(rng.permutation(members)):
            folds[(offset + position) % k].append(int(index))
        offset += len(members)  # the next label starts where this one stopped: fold sizes stay within one
    return [sorted(fold) for fold in folds]


@dataclass(frozen=True)
class FoldSplit:
    """Indices into the pooled posts of one fold's train, dev and test sets."""

    fold: int
    train: list[int]
    dev: list[int]
    test: list[int]


def fold_split(
    labels: Sequence[int],
    folds: Sequence[Sequence[int]],
    fold: int,
    seed: int,
    dev_fraction: float = DEV_FRACTION,
) -> FoldSplit:
    """Fold ``fold`` as test; a stratified ``dev_fraction`` of the other posts as dev; the rest trains."""
    if not 0 < dev_fraction < 1:
        raise ValueError(f"dev_fraction must lie in (0, 1), got {dev_fraction}")
    test = sorted(folds[fold])
    held = set(test)
    rest = [i for i in range(len(labels)) if i not in held]
    # stratified_split works on samples; stand-ins carry each index and its label.
    stand_ins = [Sample(str(i), None, None, labels[i], ()) for i in rest]
    parts = stratified_split(stand_ins, {"train": 1 - dev_fraction, "dev": dev_fraction}, seed * 1_000 + fold)
    return FoldSplit(
        fold,
        sorted(int(s.id) for s in parts["train"]),
        sorted(int(s.id) for s in parts["dev"]),
        test,
    )
