"""The DRF head against a 2-d example worked out by hand (equations (3)-(8), (10)-(12), (14)-(16)).

The hand-worked tests use the paper-literal variant; the robust variant's departures (softmax weights, detached
recovery targets, per-term classification, floor admission, encoder-space queues) are tested at the end.

Setup (fixed by ``head`` below): queues Q_v = {(1,0), (-1,0)} so mu_v = (0,0), sigma_v = 1, and
Q_t = {(1,0), (1,2)} so mu_t = (1,1), sigma_t = 1.  Converters C_{v->t}(f) = 2f + (1,1), C_{t->v}(f) = f - (1,0);
fusion F([a; b]) = a + b; classifier W = I, b = 0.  Sample f^v = (1,0), f^t = (1,3):
  f^{v->t} = (3,1), f^{t->v} = (0,3)
  q^v = e^-0.5, q^t = e^-2, q^{v->t} = e^-2, q^{t->v} = e^-4.5
  weights of (12): intact e^-2.5, image+recovered text e^-2.5, recovered image+text e^-6.5
  F terms: (2,3), (4,1), (1,6)
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from core.drf import VARIANTS, DRFConfig, DRFHead

E = math.exp


def linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def make_head(**options: bool | float | str) -> DRFHead:
    head = DRFHead(
        DRFConfig(num_classes=2, dim=2, queue_size=4, dropout=0.0, **{**VARIANTS["paper"], **options})
    )
    head.converter_v2t = linear([[2, 0], [0, 2]], [1, 1])
    head.converter_t2v = linear([[1, 0], [0, 1]], [-1, 0])
    head.fusion = linear([[1, 0, 1, 0], [0, 1, 0, 1]], [0, 0])
    head.classifier = linear([[1, 0], [0, 1]], [0.25, -0.25])
    head.image_queue.push(torch.tensor([[1.0, 0], [-1, 0]]))
    head.text_queue.push(torch.tensor([[1.0, 0], [1, 2]]))
    return head.eval().requires_grad_(False)  # hand-set weights; gradients are tested separately


F_V = torch.tensor([[1.0, 0]])
F_T = torch.tensor([[1.0, 3]])
YES, NO = torch.tensor([True]), torch.tensor([False])


def test_fusion_weights_and_fused_feature_match_equation_12() -> None:
    out = make_head()(F_V, F_T, YES, YES)
    assert out.fusion_weights[0].tolist() == pytest.approx([E(-2.5), E(-2.5), E(-6.5)], rel=1e-5)
    expected = [E(-2.5) * 6 + E(-6.5) * 1, E(-2.5) * 4 + E(-6.5) * 6]
    assert out.fused[0].tolist() == pytest.approx(expected, rel=1e-5)
    assert out.logits[0].tolist() == pytest.approx([expected[0] + 0.25, expected[1] - 0.25], rel=1e-5)
    assert out.log_quality_image.tolist() == pytest.approx(
        [-0.5]
    ) and out.log_quality_text.tolist() == pytest.approx([-2])


def test_losses_match_equations_3_4_7_8_15_16() -> None:
    out = make_head()(F_V, F_T, YES, YES, labels=torch.tensor([0]))
    # (3): exp(||f^v-mu_v|| - ||f^v-mu_t||) + exp(||f^t-mu_t|| - ||f^t-mu_v||) = exp(1-1) + exp(2-sqrt(10))
    assert float(out.loss_dis) == pytest.approx(1 + E(2 - math.sqrt(10)), rel=1e-5)
    # (4): ||(3,1)-(1,3)|| = sqrt 8 and ||(0,3)-(1,0)|| = sqrt 10
    assert float(out.recovery_terms["sample_v2t"]) == pytest.approx(math.sqrt(8), rel=1e-5)
    assert float(out.recovery_terms["sample_t2v"]) == pytest.approx(math.sqrt(10), rel=1e-5)
    # (5)-(7): C_{v->t}(Q_v) = {(3,1), (-1,1)}: mean (1,1) = mu_t, sigma 2 vs 1 -> 1
    #          C_{t->v}(Q_t) = {(0,0), (0,2)}: mean (0,1) vs mu_v = (0,0) -> 1, sigma 1 = sigma_v -> 0
    assert float(out.recovery_terms["distribution_v2t"]) == pytest.approx(1.0, rel=1e-5)
    assert float(out.recovery_terms["distribution_t2v"]) == pytest.approx(1.0, rel=1e-5)
    assert float(out.loss_rec) == pytest.approx(math.sqrt(8) + math.sqrt(10) + 2, rel=1e-5)
    m0, m1 = E(-2.5) * 6 + E(-6.5) + 0.25, E(-2.5) * 4 + E(-6.5) * 6 - 0.25
    cross_entropy = math.log(E(m0) + E(m1)) - m0
    assert float(out.loss_cls) == pytest.approx(cross_entropy, rel=1e-5)
    assert float(out.loss) == pytest.approx(
        float(out.loss_dis) + float(out.loss_rec) + cross_entropy, rel=1e-5
    )


def test_presence_flags_remove_exactly_the_terms_of_equation_12() -> None:
    head = make_head()
    garbage = torch.full((1, 2), float("nan"))
    image_only = head(F_V, garbage, YES, NO)
    assert image_only.fusion_weights[0].tolist() == pytest.approx([0, E(-2.5), 0], rel=1e-5)
    assert image_only.fused[0].tolist() == pytest.approx([E(-2.5) * 4, E(-2.5) * 1], rel=1e-5)
    text_only = head(garbage, F_T, NO, YES)
    assert text_only.fusion_weights[0].tolist() == pytest.approx([0, 0, E(-6.5)], rel=1e-5)
    assert text_only.fused[0].tolist() == pytest.approx([E(-6.5) * 1, E(-6.5) * 6], rel=1e-5)
    # A missing modality is a zero feature, whatever the caller passed.
    assert text_only.image_features.tolist() == [[0.0, 0.0]]


def test_sample_recovery_needs_both_modalities() -> None:
    out = make_head()(F_V, F_T, YES, NO, labels=torch.tensor([1]))
    assert float(out.recovery_terms["sample_v2t"]) == 0.0 and float(out.recovery_terms["sample_t2v"]) == 0.0
    # (3) keeps only the image term: exp(1 - 1)
    assert float(out.loss_dis) == pytest.approx(1.0, rel=1e-6)


def test_no_usable_modality_abstains_with_the_classifier_bias() -> None:
    out = make_head()(F_V, F_T, NO, NO, labels=torch.tensor([0]))
    assert out.fused.tolist() == [[0.0, 0.0]]
    assert out.logits.tolist() == [[0.25, -0.25]]
    assert out.abstained.tolist() == [True]
    assert torch.isfinite(out.loss)


def test_ablations_change_exactly_their_component() -> None:
    no_gauss = make_head(gaussian_weights=False)(F_V, F_T, YES, YES)
    assert no_gauss.fusion_weights[0].tolist() == [1.0, 1.0, 1.0]
    assert no_gauss.fused[0].tolist() == pytest.approx([2 + 4 + 1, 3 + 1 + 6])
    no_expansion = make_head(expansion=False)
    assert no_expansion(F_V, F_T, YES, YES).fusion_weights[0].tolist() == pytest.approx(
        [E(-2.5), 0, 0], rel=1e-5
    )
    assert no_expansion(F_V, F_T, YES, NO).fusion_weights[0].tolist() == pytest.approx(
        [0, E(-2.5), 0], rel=1e-5
    )
    assert no_expansion(F_V, F_T, NO, YES).fusion_weights[0].tolist() == pytest.approx(
        [0, 0, E(-6.5)], rel=1e-5
    )
    label = torch.tensor([0])
    no_dis = make_head(distribution_constraint=False)(F_V, F_T, YES, YES, labels=label)
    assert float(no_dis.loss_dis) == 0.0 and float(no_dis.loss_rec) == pytest.approx(
        math.sqrt(8) + math.sqrt(10) + 2
    )
    no_sample = make_head(sample_recovery=False)(F_V, F_T, YES, YES, labels=label)
    assert float(no_sample.loss_rec) == pytest.approx(2.0, rel=1e-5)
    no_distribution = make_head(distribution_recovery=False)(F_V, F_T, YES, YES, labels=label)
    assert float(no_distribution.loss_rec) == pytest.approx(math.sqrt(8) + math.sqrt(10), rel=1e-5)


def test_gradients_reach_both_converters_fusion_and_classifier_but_not_queues() -> None:
    torch.manual_seed(0)
    head = DRFHead(DRFConfig(num_classes=3, dim=8, queue_size=16, dropout=0.0)).train()
    head.image_queue.push(torch.randn(6, 8))
    head.text_queue.push(torch.randn(6, 8) + 1)
    f_v = torch.randn(4, 8, requires_grad=True)
    f_t = torch.randn(4, 8, requires_grad=True)
    present_v = torch.tensor([True, True, False, True])
    present_t = torch.tensor([True, False, True, True])
    out = head(f_v, f_t, present_v, present_t, labels=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    for name in ("converter_v2t", "converter_t2v", "fusion", "classifier"):
        grads = [p.grad for p in getattr(head, name).parameters()]
        assert all(g is not None and bool(g.abs().sum() > 0) for g in grads), name
    assert all(not b.requires_grad for b in head.buffers())
    # Absent rows receive no gradient: their features are replaced, not used.
    assert f_v.grad[2].abs().sum() == 0 and f_t.grad[1].abs().sum() == 0


def test_update_queues_enqueues_present_features_that_pass_rule_13() -> None:
    head = make_head()
    out = head(
        torch.tensor([[0.5, 0], [9, 9]]),
        torch.tensor([[1.0, 1], [5, 5]]),
        torch.tensor([True, True]),
        torch.tensor([True, False]),
    )
    accepted_v, accepted_t = head.update_queues(out)
    assert accepted_v.tolist() == [True, True]  # queues hold 2 of L = 4: warm-up accepts everything present
    assert accepted_t.tolist() == [True, False]  # the absent text never enters
    assert head.image_queue.contents().tolist() == [[1, 0], [-1, 0], [0.5, 0], [9, 9]]
    assert head.text_queue.contents().tolist() == [[1, 0], [1, 2], [1, 1]]


def test_eval_mode_is_deterministic_and_bad_shapes_are_rejected() -> None:
    torch.manual_seed(1)
    head = DRFHead(DRFConfig(num_classes=3, dim=8, queue_size=16)).eval()
    f = torch.randn(5, 8)
    present = torch.ones(5, dtype=torch.bool)
    assert torch.equal(head(f, f, present, present).logits, head(f, f, present, present).logits)
    with pytest.raises(ValueError, match=r"must be \[B, 8\] and \[B, 8\]"):
        head(torch.randn(2, 4), torch.randn(2, 4), present[:2], present[:2])
    with pytest.raises(ValueError, match="must be"):
        head(torch.randn(2, 8), torch.randn(3, 8), present[:2], present[:3])
    with pytest.raises(ValueError, match="dropout"):
        DRFConfig(num_classes=2, dropout=1.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_keeps_tiny_fusion_weights_and_float32_logits(dtype: torch.dtype) -> None:
    head = make_head()
    far = torch.tensor([[40.0, 0]])  # log q^v floored at -40: weights e^-40 * q, far below float16's range
    with torch.autocast("cpu", dtype=dtype):
        out = head(far, F_T, YES, NO)
    assert out.logits.dtype == torch.float32 and out.fused.dtype == torch.float32
    assert float(out.fusion_weights[0, 1]) > 0 and float(out.fused.abs().sum()) > 0


# ------------------------------------------------------------------------------- the robust variant (default)


def test_softmax_fusion_weights_sum_to_one_over_the_present_terms() -> None:
    """Same example: summed log qualities -2.5, -2.5, -6.5, so the weights are their softmax (over τ)."""
    out = make_head(fusion="softmax")(F_V, F_T, YES, YES)
    total = 2 * E(-2.5) + E(-6.5)
    assert out.fusion_weights[0].tolist() == pytest.approx(
        [E(-2.5) / total, E(-2.5) / total, E(-6.5) / total]
    )
    assert out.fused[0].tolist() == pytest.approx(
        [(6 * E(-2.5) + E(-6.5)) / total, (4 * E(-2.5) + 6 * E(-6.5)) / total]
    )
    hot = make_head(fusion="softmax", temperature=2.0)(F_V, F_T, YES, YES)
    total = 2 * E(-1.25) + E(-3.25)
    assert hot.fusion_weights[0].tolist() == pytest.approx(
        [E(-1.25) / total, E(-1.25) / total, E(-3.25) / total]
    )
    # One modality: its one term gets all the weight, however atypical; none: no term, M = 0.
    far = make_head(fusion="softmax")(torch.tensor([[90.0, 0]]), F_T, YES, NO)
    assert far.fusion_weights[0].tolist() == [0.0, 1.0, 0.0] and far.fused[0].tolist() == pytest.approx(
        [271.0, 1.0]
    )  # (90,0) + (181,1)
    assert make_head(fusion="softmax")(F_V, F_T, NO, NO).fused.tolist() == [[0.0, 0.0]]
    # ... and a batch holding such a row still trains: no NaN (softmax over no term) reaches any gradient.
    head = make_head(fusion="softmax", detach_quality=False).requires_grad_(True)
    f_v = torch.tensor([[1.0, 0], [0.5, 0.5]], requires_grad=True)
    out = head(
        f_v,
        F_T.repeat(2, 1),
        torch.tensor([True, False]),
        torch.tensor([True, False]),
        labels=torch.tensor([0, 1]),
    )
    out.loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in head.parameters() if p.grad is not None)
    assert bool(torch.isfinite(f_v.grad).all())


def test_a_far_off_image_hands_its_weight_to_the_recovered_image_term() -> None:
    """Quality-aware fusion: the further f^v lies from the image distribution, the more the text's own term counts."""
    head = make_head(fusion="softmax")
    near = head(F_V, F_T, YES, YES).fusion_weights[0]
    far = head(torch.tensor([[6.0, 0]]), F_T, YES, YES).fusion_weights[0]
    assert float(far[2]) > 0.99 > float(near[2])


def test_robust_losses_detach_recovery_targets_and_classify_every_expanded_sample() -> None:
    label = torch.tensor([0])
    paper = make_head()(F_V, F_T, YES, YES, labels=label)
    robust = make_head(fusion="softmax", detach_targets=True, term_loss=1.0)(F_V, F_T, YES, YES, labels=label)
    # (3), (8) unchanged; (16) gains the mean cross-entropy of the three terms F -> classifier: (2,3), (4,1), (1,6).
    assert float(robust.loss_rec) == pytest.approx(float(paper.loss_rec), rel=1e-5)
    assert float(robust.loss_dis) == pytest.approx(float(paper.loss_dis), rel=1e-5)
    terms = [(2.25, 2.75), (4.25, 0.75), (1.25, 5.75)]
    term_ce = sum(math.log(E(a) + E(b)) - a for a, b in terms) / 3
    assert float(robust.loss) == pytest.approx(
        float(robust.loss_dis) + float(robust.loss_rec) + float(robust.loss_cls) + term_ce, rel=1e-5
    )
    # Detached targets: (4) moves the converter, never the target feature.
    for detach, reaches_target in ((True, False), (False, True)):
        head = make_head(detach_targets=detach, distribution_constraint=False, distribution_recovery=False)
        head.requires_grad_(True)
        f_t = F_T.clone().requires_grad_(True)
        out = head(F_V, f_t, YES, YES, labels=label)
        out.recovery_terms["sample_v2t"].backward()
        assert (f_t.grad is not None and bool(f_t.grad.abs().sum() > 0)) == reaches_target


def test_floor_admission_takes_all_but_outliers_so_the_queue_stays_current() -> None:
    """Rule (13) admits only features closer than the queue's average, so acceptance collapses as the queue
    tightens; the floor rule keeps admitting features drawn from the queue's own distribution."""
    torch.manual_seed(0)
    rates = {}
    for rule in ("rule13", "floor"):
        head = DRFHead(
            DRFConfig(num_classes=2, dim=16, queue_size=64, admission=rule, quality_space="projected")
        )
        accepted = []
        for _ in range(40):
            f = torch.randn(32, 16)
            out = head(f, f, torch.ones(32, dtype=torch.bool), torch.ones(32, dtype=torch.bool))
            accepted.append(float(head.update_queues(out)[0].float().mean()))
        rates[rule] = sum(accepted[-10:]) / 10
        sigma = float(head.image_queue.sigma)
        if rule == "floor":
            assert sigma == pytest.approx(4.0, rel=0.1)  # sqrt(E||f - mu||^2) of a 16-d standard normal
    assert rates["floor"] > 0.95 and rates["rule13"] < 0.6
    far = torch.full((1, 16), 10.0)
    assert not bool(head.image_queue.admits(far))


def test_encoder_space_head_projects_only_the_fusion_inputs() -> None:
    torch.manual_seed(0)
    head = DRFHead(
        DRFConfig(num_classes=3, dim=4, image_dim=6, text_dim=5, queue_size=8, dropout=0.0)
    ).train()
    assert head.image_queue.dim == 6 and head.text_queue.dim == 5
    project = (nn.Linear(6, 4), nn.Linear(5, 4))
    f_v, f_t = torch.randn(3, 6), torch.randn(3, 5)
    present = torch.ones(3, dtype=torch.bool)
    out = head(f_v, f_t, present, present, labels=torch.tensor([0, 1, 2]), projections=project)
    assert (
        out.recovered_text.shape == (3, 5)
        and out.recovered_image.shape == (3, 6)
        and out.fused.shape == (3, 4)
    )
    out.loss.backward()
    assert all(p.grad is not None for layer in project for p in layer.parameters())
    with pytest.raises(ValueError, match=r"\[B, 6\] and \[B, 5\]"):
        head(f_t, f_v, present, present, projections=project)


def specialist_head() -> DRFHead:
    """The example with the specialist terms; each specialist classifies its own feature as is (W = I, b = 0)."""
    head = make_head(fusion="softmax", specialist_terms=True)
    head.specialists = nn.ModuleList([linear([[1, 0], [0, 1]], [0, 0]) for _ in range(2)])
    return head


def test_specialist_terms_join_the_softmax_as_a_modality_with_a_typical_partner() -> None:
    """Summed log qualities -2.5, -2.5, -6.5 for the three terms of (12); image alone -0.5 - 0.5, text alone -2 - 0.5.
    Logits mix every term's own: (2.25, 2.75), (4.25, 0.75), (1.25, 5.75), then f^v = (1, 0) and f^t = (1, 3)."""
    out = specialist_head()(F_V, F_T, YES, YES)
    scores = torch.tensor([-2.5, -2.5, -6.5, -1.0, -2.5])
    weights = scores.softmax(dim=0)
    assert out.fusion_weights[0].tolist() == pytest.approx(weights[:3].tolist(), rel=1e-5)
    assert out.specialist_weights is not None
    assert out.specialist_weights[0].tolist() == pytest.approx(weights[3:].tolist(), rel=1e-5)
    terms = torch.tensor([[2.25, 2.75], [4.25, 0.75], [1.25, 5.75], [1.0, 0.0], [1.0, 3.0]])
    assert out.logits[0].tolist() == pytest.approx((weights[:, None] * terms).sum(0).tolist(), rel=1e-5)
    # M stays the fused feature of (12): the three fused terms only.
    fused = (
        weights[0] * torch.tensor([2.0, 3])
        + weights[1] * torch.tensor([4.0, 1])
        + weights[2] * torch.tensor([1.0, 6])
    )
    assert out.fused[0].tolist() == pytest.approx(fused.tolist(), rel=1e-5)


def test_recovered_penalty_lowers_exactly_the_terms_that_hold_a_recovered_feature() -> None:
    """Same example with a penalty of 2: scores -2.5, -2.5 - 2, -6.5 - 2, -1, -2.5; nothing else changes."""
    head = specialist_head()
    head.config = replace(head.config, recovered_penalty=2.0)
    out = head(F_V, F_T, YES, YES)
    weights = torch.tensor([-2.5, -4.5, -8.5, -1.0, -2.5]).softmax(dim=0)
    assert out.specialist_weights is not None
    assert torch.cat([out.fusion_weights[0], out.specialist_weights[0]]).tolist() == pytest.approx(
        weights.tolist(), rel=1e-5
    )
    with pytest.raises(ValueError, match="recovered_penalty"):
        replace(head.config, recovered_penalty=-1.0)


def test_specialist_terms_carry_a_missing_or_damaged_modality_to_the_intact_ones_specialist() -> None:
    head = specialist_head()
    # Text missing: image + recovered text (-2.5) and the image alone (-1) are the only terms.
    alone = head(F_V, F_T, YES, NO)
    w = torch.tensor([-2.5, -1.0]).softmax(dim=0)
    assert alone.fusion_weights[0].tolist() == pytest.approx([0.0, float(w[0]), 0.0], abs=1e-6)
    assert alone.logits[0].tolist() == pytest.approx(
        (w[0] * torch.tensor([4.25, 0.75]) + w[1] * torch.tensor([1.0, 0])).tolist(), rel=1e-5
    )
    # An image far off its distribution: nearly all the weight goes to the terms without it, the text's
    # specialist first (-2.5 against -6.5 for the recovered image + text).
    far = head(torch.tensor([[6.0, 0]]), F_T, YES, YES)
    assert far.specialist_weights is not None and float(far.specialist_weights[0, 1]) > 0.97
    assert far.logits[0].tolist() == pytest.approx([1.0, 3.0], abs=0.2)


def test_specialists_train_on_their_own_cross_entropy() -> None:
    """Each specialist is a training sample of its own (the per-term loss), so it learns even where its weight is
    small; without labels no term logits are kept beyond the forward."""
    head = make_head(fusion="softmax", specialist_terms=True, term_loss=1.0).train().requires_grad_(True)
    out = head(F_V, F_T, YES, NO, labels=torch.tensor([1]))
    assert out.term_logits is not None and out.term_logits.shape == (5, 1, 2)
    out.loss.backward()
    image_specialist, text_specialist = head.specialists
    assert any(bool(p.grad.abs().sum() > 0) for p in image_specialist.parameters())
    # The text is missing: its specialist's term does not exist, so nothing trains it on this post.
    assert all(p.grad is None or not bool(p.grad.abs().sum() > 0) for p in text_specialist.parameters())


def test_specialist_gradient_scales_only_what_the_mixed_prediction_teaches_the_specialists() -> None:
    """The prediction is the same at every share; the mixed cross-entropy's gradient into a specialist is scaled by
    the share (0: it learns from its own term alone), and the fused terms' gradient is untouched."""
    grads, logits, fusion_grads = {}, {}, {}
    for share in (1.0, 0.5, 0.0):
        torch.manual_seed(0)
        head = make_head(fusion="softmax", specialist_terms=True, term_loss=0.0, specialist_gradient=share)
        head.train().requires_grad_(True)
        out = head(F_V, F_T, YES, YES, labels=torch.tensor([1]))
        out.loss_cls.backward()
        logits[share] = out.logits.detach()
        grads[share] = torch.cat([p.grad.flatten() for p in head.specialists.parameters()])
        fusion_grads[share] = torch.cat([p.grad.flatten() for p in head.classifier.parameters()])
    assert torch.equal(logits[1.0], logits[0.5]) and torch.equal(logits[1.0], logits[0.0])
    assert grads[1.0].abs().sum() > 0
    torch.testing.assert_close(grads[0.5], 0.5 * grads[1.0])
    assert not grads[0.0].any()
    torch.testing.assert_close(fusion_grads[0.0], fusion_grads[1.0])
    with pytest.raises(ValueError, match="specialist_gradient"):
        DRFConfig(num_classes=2, specialist_gradient=1.5)
