"""The product regime's damage mix: each post shown intact or under one of its damaged variants."""

from __future__ import annotations

import pytest
import torch

from core.model import FeatureTable
from core.training.mixing import DamageMix


def _table(value: float, n: int = 400, image: bool = True, text: bool = True) -> FeatureTable:
    """n posts whose features all equal ``value`` (which variant a row came from is readable off it)."""
    return FeatureTable(
        torch.full((n, 4), value),
        torch.full((n, 3), value),
        torch.full((n,), image),
        torch.full((n,), text),
        torch.arange(n) % 3,
    )


def _variants() -> dict[str, FeatureTable]:
    return {"clean": _table(0.0), "image/C": _table(1.0), "image/D": _table(0.0, image=False)}


def test_each_row_is_one_whole_variant_of_the_same_post_with_its_label() -> None:
    mix = DamageMix(_variants(), intact=0.5, seed=0)
    index = torch.arange(0, 400, 2)
    rows = mix.features(index)
    assert torch.equal(rows.labels, index % 3)
    corrupted = rows.image[:, 0] == 1.0
    missing = ~rows.image_present
    intact = ~corrupted & ~missing
    assert not bool((corrupted & missing).any())
    assert torch.equal(rows.text, torch.where(corrupted[:, None], 1.0, 0.0).expand(-1, 3))  # the same variant
    assert bool(rows.text_present.all())
    # About half intact, the rest split between the two damaged variants.
    assert 70 <= int(intact.sum()) <= 130 and int(corrupted.sum()) > 25 and int(missing.sum()) > 25


def test_every_call_draws_afresh_but_a_seed_repeats_and_fixed_covers_every_post() -> None:
    first, again = DamageMix(_variants(), seed=3), DamageMix(_variants(), seed=3)
    index = torch.arange(400)
    a, b = first.features(index), again.features(index)
    assert torch.equal(a.image, b.image) and torch.equal(a.image_present, b.image_present)
    assert not torch.equal(first.features(index).image, a.image)  # the next epoch sees other damage
    dev = DamageMix(_variants(), intact=0.0, seed=1).fixed()
    assert len(dev) == 400 and not bool(((dev.image[:, 0] == 0.0) & dev.image_present).any())  # none intact


def test_bad_mixes_are_refused() -> None:
    with pytest.raises(ValueError, match="clean"):
        DamageMix({"image/C": _table(1.0)})
    with pytest.raises(ValueError, match="same posts"):
        DamageMix({"clean": _table(0.0), "image/C": _table(1.0, n=10)})
    with pytest.raises(ValueError, match="probability"):
        DamageMix(_variants(), intact=1.5)
