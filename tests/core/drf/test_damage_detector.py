"""The learned damage detector (core/drf/damage.py): inert until trained, and it sees damage the Gaussian cannot."""

from __future__ import annotations

import torch

from core.drf import DRFConfig, DRFHead
from core.drf.damage import damage_loss
from core.evaluation.scoring import auroc
from core.model import create_model
from core.model.drf_model import DRFModel

DIM = 8


def robust_head(**options: bool) -> DRFHead:
    return DRFHead(DRFConfig(num_classes=2, dim=DIM, queue_size=64, dropout=0.0, **options))


def test_an_untrained_detector_changes_nothing_and_draws_no_random_numbers() -> None:
    heads, draws = [], []
    for detector in (True, False):
        torch.manual_seed(0)
        heads.append(robust_head(damage_detector=detector).eval())
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])  # every later draw (batches, dropout) is the same with it
    features = torch.randn(2, 32, DIM)
    present = torch.rand(2, 32) > 0.2
    for head in heads:
        head.update_queues(head(features[0], features[1], present[0], present[1]))
    with_it, without = (head(features[0], features[1], present[0], present[1]) for head in heads)
    assert torch.equal(with_it.logits, without.logits)
    assert torch.equal(with_it.log_quality_text, without.log_quality_text)
    assert torch.equal(with_it.term_weights, without.term_weights)
    assert with_it.damage_logits is not None and without.damage_logits is None


def test_trained_on_a_damage_mix_it_lowers_the_quality_of_damage_the_gaussian_calls_typical() -> None:
    # Damaged texts lie *closer* to the mean than intact ones (as typo'd tweets do): the Gaussian ranks them higher.
    torch.manual_seed(0)
    head = robust_head()
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-2)

    def batch(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        image, text = torch.randn(size, DIM), torch.randn(size, DIM)
        intact = torch.ones(size, 2, dtype=torch.bool)
        intact[:, 1] = torch.rand(size) < 0.5
        text = torch.where(intact[:, 1:], text, 0.3 * text)
        return image, text, intact, (image[:, 0] > 0).long()

    present = torch.ones(64, dtype=torch.bool)
    for _ in range(150):
        image, text, intact, labels = batch(64)
        out = head(image, text, present, present, labels=labels, intact=intact)
        optimiser.zero_grad()
        assert out.loss is not None
        out.loss.backward()
        optimiser.step()
        head.update_queues(out)
    head.eval()
    image, text, intact, _ = batch(400)
    everything = torch.ones(400, dtype=torch.bool)
    out = head(image, text, everything, everything)
    damaged = ~intact[:, 1]
    quality = out.log_quality_text.detach().numpy()
    assert auroc(quality[~damaged.numpy()], quality[damaged.numpy()]) > 0.95
    assert out.damage_logits is not None
    assert (
        float(out.damage_logits.detach()[~damaged, 0].clamp_max(0).abs().max()) < 0.5
    )  # the image was never damaged
    # The damaged text's weight moved to the image's specialist.
    assert out.term_weights[damaged, 3].mean() > 2 * out.term_weights[~damaged, 3].mean()


def test_the_detector_loss_skips_missing_modalities() -> None:
    logits = torch.tensor([[5.0, -5.0], [100.0, 3.0]])
    present = torch.tensor([[True, True], [False, True]])
    intact = torch.tensor([[True, False], [False, True]])
    loss = damage_loss(logits, present, intact)
    assert 0 < float(loss) < 0.05  # the absent image, scored confidently wrong, is not counted
    assert float(damage_loss(logits, torch.zeros(2, 2, dtype=torch.bool), intact)) == 0.0


def test_a_checkpoint_config_from_before_the_detector_builds_none() -> None:
    config = create_model("tiny", labels=["neg", "pos"]).config()
    assert config["head"]["damage_detector"] is True
    del config["head"]["damage_detector"]
    assert DRFModel.from_config(config).head.detectors is None
