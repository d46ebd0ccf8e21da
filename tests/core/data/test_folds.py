"""Cross-validation folds: stratified, disjoint, covering every post; each fold's dev never touches its test."""

from __future__ import annotations

from collections import Counter

import pytest

from core.data.folds import DEV_FRACTION, fold_split, stratified_folds

LABELS = [0] * 50 + [1] * 30 + [2] * 20 + [0] * 7  # 107 posts, uneven classes, not sorted by label


def test_folds_are_disjoint_cover_every_post_and_are_stratified() -> None:
    folds = stratified_folds(LABELS, 5, seed=0)
    assert len(folds) == 5
    seen = [i for fold in folds for i in fold]
    assert sorted(seen) == list(range(len(LABELS)))  # every post exactly once
    assert max(len(f) for f in folds) - min(len(f) for f in folds) <= 1
    totals = Counter(LABELS)
    for fold in folds:
        counts = Counter(LABELS[i] for i in fold)
        for label, total in totals.items():
            assert abs(counts[label] - total / 5) < 1  # each fold holds its share of every label


def test_folds_are_seeded() -> None:
    assert stratified_folds(LABELS, 5, seed=3) == stratified_folds(LABELS, 5, seed=3)
    assert stratified_folds(LABELS, 5, seed=3) != stratified_folds(LABELS, 5, seed=4)


def test_fold_split_dev_is_a_stratified_slice_of_the_rest_never_the_test() -> None:
    folds = stratified_folds(LABELS, 4, seed=0)
    for k in range(4):
        split = fold_split(LABELS, folds, k, seed=0)
        train, dev, test = set(split.train), set(split.dev), set(split.test)
        assert test == set(folds[k])
        assert not (dev & test) and not (train & test) and not (train & dev)
        assert train | dev | test == set(range(len(LABELS)))
        assert len(dev) == pytest.approx(DEV_FRACTION * (len(LABELS) - len(test)), abs=1)
        assert set(Counter(LABELS[i] for i in dev)) == {0, 1, 2}  # every label reaches dev


def test_too_few_folds_or_posts_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 folds"):
        stratified_folds(LABELS, 1, seed=0)
    with pytest.raises(ValueError, match="cannot fill"):
        stratified_folds([0, 1], 3, seed=0)
