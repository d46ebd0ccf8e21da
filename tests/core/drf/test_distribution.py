"""Feature queues and equations (1), (2), (9), (13) against small hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from core.drf import SIGMA_EPS, FeatureQueue, QueueStats, queue_statistics
from core.drf.distribution import LOG_QUALITY_FLOOR, passes_enqueue_rule, stats_log_quality


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_mean_and_scalar_sigma_of_queue_match_equations_1_and_2() -> None:
    # mu = ((0+4+2)/3, (0+0+6)/3) = (2, 2); squared distances 8, 8, 16 -> sigma = sqrt(32/3)
    stats = queue_statistics(t([0, 0], [4, 0], [2, 6]))
    assert torch.allclose(stats.mean, t([2, 2])[0])
    assert float(stats.sigma) == pytest.approx(math.sqrt(32 / 3), rel=1e-6)
    assert stats.count == 3 and stats.capacity == 3 and not stats.warming_up


def test_quality_is_the_gaussian_probability_of_equation_9_over_its_peak() -> None:
    stats = queue_statistics(t([1, 0], [-1, 0]))  # mu = 0, sigma = 1
    # (9): p(f) = 1/sqrt(2 pi) * exp(-||f||^2 / 2), so p([2, 0]) / p(mu) = 0.0539909665 / 0.3989422804 = exp(-2)
    quality = stats_log_quality(t([0, 0], [1, 0], [2, 0]), stats).exp()
    assert quality.tolist() == pytest.approx([1.0, math.exp(-0.5), 0.0539909665 / 0.3989422804], rel=1e-6)


def test_enqueue_threshold_is_the_mean_quality_of_the_queue_and_the_rule_is_strict() -> None:
    stats = queue_statistics(t([1, 0], [-1, 0]))  # both members have q = exp(-1/2)
    assert float(stats.threshold) == pytest.approx(math.exp(-0.5), rel=1e-6)
    # q = exp(-0.125) passes, q = exp(-1.125) fails, q = exp(-0.5) equals the threshold and fails (rule is '>')
    assert passes_enqueue_rule(t([0.5, 0], [1.5, 0], [0, 1]), stats).tolist() == [True, False, False]


def test_quality_is_in_unit_interval_and_never_underflows_in_768_dimensions() -> None:
    generator = torch.Generator().manual_seed(0)
    queue = torch.randn(64, 768, generator=generator)
    stats = queue_statistics(queue)
    near = torch.randn(8, 768, generator=generator)
    far = stats.mean + 1e4 * torch.ones(
        1, 768
    )  # naive float32 exp(-||f-mu||^2 / 2 sigma^2) would be exactly 0
    quality = stats_log_quality(torch.cat([near, far, stats.mean[None]]), stats).exp()
    assert bool((quality > 0).all()) and bool((quality <= 1).all())
    assert float(quality[-1]) == 1.0
    assert float(quality[-2]) == pytest.approx(math.exp(LOG_QUALITY_FLOOR))
    assert float(quality[-2] ** 2) > 0  # a product of two qualities (a fusion weight) stays positive too


def test_degenerate_queue_has_floored_sigma_and_tiny_queue_scores_everything_as_one() -> None:
    identical = queue_statistics(t([3, 3], [3, 3]))
    assert float(identical.sigma) == pytest.approx(SIGMA_EPS)
    assert math.isfinite(float(stats_log_quality(t([4, 3]), identical)))
    single = queue_statistics(t([3, 3]), capacity=8)
    assert stats_log_quality(t([100, -100], [3, 3]), single).tolist() == [0.0, 0.0]
    empty = queue_statistics(torch.zeros(0, 2), capacity=8)
    assert empty.count == 0 and stats_log_quality(t([5, 5]), empty).tolist() == [0.0]


def test_warm_up_accepts_everything_until_the_queue_is_full() -> None:
    queue = FeatureQueue(dim=2, capacity=3)
    assert queue.enqueue(t([0, 0], [2, 0])).tolist() == [True, True]
    assert queue.enqueue(t([1000, 0])).tolist() == [True]  # outlier still accepted: 2 < L = 3
    assert len(queue) == 3
    # Full now: mu = (334, 0) and the outlier dominates sigma; rule (13) applies.
    assert not queue.stats().warming_up
    assert queue.enqueue(t([300, 0], [-5000, 0])).tolist() == [True, False]


def test_queue_is_fifo_and_statistics_follow_its_contents() -> None:
    queue = FeatureQueue(dim=2, capacity=3)
    queue.push(t([1, 0], [2, 0], [3, 0], [4, 0]))
    assert queue.contents().tolist() == [[2, 0], [3, 0], [4, 0]]  # oldest evicted, oldest first
    queue.push(t([5, 0]))
    assert queue.contents().tolist() == [[3, 0], [4, 0], [5, 0]]
    expected = queue_statistics(t([3, 0], [4, 0], [5, 0]))
    stats = queue.stats()
    assert torch.equal(stats.mean, expected.mean) and torch.equal(stats.sigma, expected.sigma)
    assert torch.equal(stats.threshold, expected.threshold)


def test_enqueue_respects_presence_flags() -> None:
    queue = FeatureQueue(dim=2, capacity=4)
    accepted = queue.enqueue(t([1, 1], [2, 2]), present=torch.tensor([False, True]))
    assert accepted.tolist() == [False, True]
    assert queue.contents().tolist() == [[2, 2]]


def test_queue_contents_are_detached() -> None:
    queue = FeatureQueue(dim=2, capacity=4)
    features = t([1, 0], [0, 1]).requires_grad_()
    queue.push(features * 2)
    assert not queue.features.requires_grad and queue.mean.grad_fn is None and queue.sigma.grad_fn is None


def test_bad_input_gives_clear_errors() -> None:
    stats = queue_statistics(t([1, 0], [-1, 0]))
    with pytest.raises(ValueError, match="dimension 3"):
        passes_enqueue_rule(torch.zeros(2, 3), stats)
    with pytest.raises(TypeError, match="floating-point"):
        queue_statistics(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed the queue capacity"):
        queue_statistics(torch.zeros(4, 2), capacity=3)
    with pytest.raises(ValueError, match="capacity"):
        FeatureQueue(dim=2, capacity=0)


def test_stats_built_by_hand_behave_like_queue_stats() -> None:
    stats = QueueStats(
        mean=torch.zeros(2), sigma=torch.tensor(1.0), threshold=torch.tensor(0.5), count=10, capacity=10
    )
    # q([1, 0]) = exp(-0.5) = 0.607 > 0.5; q([2, 0]) = exp(-2) = 0.135 < 0.5
    assert passes_enqueue_rule(t([1, 0], [2, 0]), stats).tolist() == [True, False]
