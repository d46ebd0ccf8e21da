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
    # Only the image is ever damaged here: intact marks it, and the text stays intact throughout.
    assert torch.equal(rows.intact[:, 0], intact) and bool(rows.intact[:, 1].all())
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


def test_damaged_features_stay_out_of_the_queues_and_the_recovery_targets() -> None:
    from core.drf.head import DRFConfig, DRFHead

    torch.manual_seed(0)
    head = DRFHead(DRFConfig(num_classes=3, dim=8, queue_size=64, admission_floor=-1e9)).train(
        False
    )  # no dropout
    features = torch.randn(6, 8), torch.randn(6, 8)
    present = torch.ones(6, dtype=torch.bool)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    intact = torch.tensor(
        [[True, True], [False, True], [True, False], [True, True], [False, False], [True, True]]
    )
    out = head(*features, present, present, labels=labels, intact=intact)
    accepted_image, accepted_text = head.update_queues(out)
    assert torch.equal(accepted_image, intact[:, 0]) and torch.equal(accepted_text, intact[:, 1])
    # Sample recovery (4) learns only from posts whose two modalities are both intact: rows 0, 3 and 5 (the loss
    # is a mean over the whole batch, so over 6 rows it is half what the 3 intact rows alone give).
    only_intact = head(*(f[[0, 3, 5]] for f in features), present[:3], present[:3], labels=labels[[0, 3, 5]])
    for term in ("sample_v2t", "sample_t2v"):
        assert torch.allclose(out.recovery_terms[term] * 2, only_intact.recovery_terms[term], atol=1e-5)
