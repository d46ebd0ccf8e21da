"""Feature distributions of DRF (paper section 3.2 and 3.4): feature queues, their statistics, quality, enqueue rule.

Each modality's feature distribution is approximated by an isotropic Gaussian whose mean (1) and scalar standard
deviation (2) come from a FIFO queue of L recent features.

Decisions where the paper is silent (documented here, tested in tests/core/drf/test_distribution.py):

* Quality. The density (9) of a 768-d feature is far outside float range (the normaliser 1/(sqrt(2 pi) sigma) is
  applied once, not per dimension, so p is a scaled "distance from the mean" score).  We publish and use
  q(f) = p(f) / p(mu) = exp(-||f - mu||^2 / (2 sigma^2)), which lies in (0, 1], and compute it in log space.
  log q is floored at ``LOG_QUALITY_FLOOR`` so q stays strictly positive in float32 and a product of two
  qualities (the fusion weights of (12)) never underflows to zero.
* The enqueue rule (13) compares p_i > mean_j p(f_j); the common factor 1/(sqrt(2 pi) sigma) cancels, so it is
  evaluated on q.
* sigma is floored at ``SIGMA_EPS`` so a queue of identical features does not divide by zero.
* Queue contents and their statistics are buffers: they never carry gradient (features are detached on enqueue).
* Warm-up: while a queue holds fewer than its capacity L, every present feature is enqueued unconditionally, and
  while it holds fewer than 2 features (no spread to measure) every feature has quality 1.

Admission (which features enter the queue) has two rules, chosen by the head's configuration (core/drf/head.py):

* ``"rule13"``, the paper's (13): q_i > mean_j q(f_j).  It admits only features closer to the mean than the queue's
  own average, so each generation of the queue is tighter than the last: sigma shrinks and acceptance falls towards
  zero (measured: docs/evaluation.md).  Kept for the paper-literal variant.
* ``"floor"`` (default): log q_i >= a fixed floor (``DEFAULT_ADMISSION_FLOOR``: ||f - mu|| <= 3 sigma), i.e. reject
  only outliers.  Features from the queue's own distribution are almost all admitted, so the queue is a FIFO of
  recent features with a stable sigma, and a far-off feature (garbage, poisoning) stays out.  The floor is loose on
  purpose: at 2 sigma a distribution with separated modes collapsed onto one mode (the queue's mean drifts towards
  the mode it holds most of, the others fall outside, sigma shrinks; measured on the test suite's synthetic data).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: Lower bound of sigma in (2): keeps (9) finite for a degenerate queue.
SIGMA_EPS = 1e-6
#: Lower bound of log q (q >= e^-40 ~ 4e-18): q^2 stays a normal float32, so fusion weights never vanish exactly.
LOG_QUALITY_FLOOR = -40.0
#: Default queue size L (paper section 4.2).
DEFAULT_QUEUE_SIZE = 512
#: Admission rules for the queues (see the module docstring).
ADMISSION_RULES = ("floor", "rule13")
#: log q floor of the "floor" rule: admit features with ||f - mu||^2 <= 9 sigma^2 (sigma^2 is the mean of the
#: squared distance, so a feature of the queue's own distribution lies near log q = -0.5).
DEFAULT_ADMISSION_FLOOR = -4.5


@dataclass(frozen=True)
class QueueStats:
    """Summary of one feature queue: everything inference needs (the Redis reference queues publish these).

    ``count`` is how many features the statistics summarise and ``capacity`` the queue size L; they decide warm-up.
    """

    mean: Tensor  # [d], mu of (1)
    sigma: Tensor  # scalar, sigma of (2), floored at SIGMA_EPS
    threshold: Tensor  # scalar, right-hand side of (13) in quality units: mean_j q(f_j)
    count: int = 0
    capacity: int = 0

    @property
    def dim(self) -> int:
        return int(self.mean.shape[-1])

    @property
    def has_spread(self) -> bool:
        """Whether sigma was measured from at least two features (otherwise every quality is 1)."""
        return self.count >= 2

    @property
    def warming_up(self) -> bool:
        """Whether the queue is still filling, so that every present feature is enqueued."""
        return self.count < max(self.capacity, 2)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> QueueStats:
        """A detached copy on ``device`` (never aliases a live queue's buffers)."""
        return QueueStats(
            mean=self.mean.detach().to(device=device, dtype=dtype, copy=True),
            sigma=self.sigma.detach().to(device=device, dtype=dtype, copy=True),
            threshold=self.threshold.detach().to(device=device, dtype=dtype, copy=True),
            count=self.count,
            capacity=self.capacity,
        )


def _check_features(features: Tensor, dim: int | None = None) -> None:
    if not isinstance(features, Tensor) or not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got {type(features).__name__}")
    if features.dim() < 1:
        raise ValueError("features must have a trailing feature dimension")
    if dim is not None and features.shape[-1] != dim:
        raise ValueError(f"features have dimension {features.shape[-1]}, the distribution has {dim}")


def distribution_moments(features: Tensor, eps: float = SIGMA_EPS) -> tuple[Tensor, Tensor]:
    """Mean (1) and scalar standard deviation (2) of a set of features [n, d] (also used for (5), (6)).

    Differentiable: distribution-based recovery (5)-(7) backpropagates through it into the converter.
    """
    _check_features(features)
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"need a non-empty [n, d] feature matrix, got shape {tuple(features.shape)}")
    mean = features.mean(dim=0)
    variance = (features - mean).pow(2).sum(dim=-1).mean()
    return mean, variance.clamp_min(eps * eps).sqrt()


def log_quality(
    features: Tensor, mean: Tensor, sigma: Tensor, floor: float | None = LOG_QUALITY_FLOOR
) -> Tensor:
    """log q(f) = log p(f; mu, sigma) - log p(mu; mu, sigma) = -||f - mu||^2 / (2 sigma^2), floored at ``floor``.

    ``features`` is [..., d]; the result is [...].  Gradient flows into ``features`` (and mean/sigma if they carry it).
    ``floor=None`` leaves it unfloored (log-space fusion weights need no floor and keep their gradient).
    """
    _check_features(features, int(mean.shape[-1]))
    squared = (features.float() - mean.float()).pow(2).sum(dim=-1)
    sigma = sigma.float().clamp_min(SIGMA_EPS)
    value = -squared / (2.0 * sigma * sigma)
    return value if floor is None else value.clamp_min(floor)


def stats_log_quality(features: Tensor, stats: QueueStats, floor: float | None = LOG_QUALITY_FLOOR) -> Tensor:
    """log q of features [..., d] under a queue's statistics; 0 (quality 1) while the queue has no spread."""
    if not stats.has_spread:
        _check_features(features, stats.dim)
        return torch.zeros(features.shape[:-1], dtype=torch.float32, device=features.device)
    return log_quality(features, stats.mean.to(features.device), stats.sigma.to(features.device), floor)


def queue_statistics(features: Tensor, capacity: int | None = None, eps: float = SIGMA_EPS) -> QueueStats:
    """Statistics of queue contents [n, d]: mu (1), sigma (2) and the mean quality of the contents (13).

    ``capacity`` is the queue size L; ``None`` means the features fill the queue (n = L, rule (13) applies).
    An empty queue gives mean 0 and quality 1 for everything.
    """
    _check_features(features)
    if features.dim() != 2:
        raise ValueError(f"queue contents must be [n, d], got shape {tuple(features.shape)}")
    features = features.detach().float()
    count = int(features.shape[0])
    capacity = count if capacity is None else int(capacity)
    if capacity < count:
        raise ValueError(f"{count} features exceed the queue capacity {capacity}")
    if count == 0:
        mean = features.new_zeros(features.shape[1])
        return QueueStats(mean, features.new_tensor(eps), features.new_tensor(1.0), 0, capacity)
    mean, sigma = distribution_moments(features, eps)
    stats = QueueStats(mean, sigma, features.new_tensor(1.0), count, capacity)
    threshold = stats_log_quality(features, stats).exp().mean()
    return QueueStats(mean, sigma, threshold, count, capacity)


def passes_enqueue_rule(
    features: Tensor, stats: QueueStats, rule: str = "rule13", floor: float = DEFAULT_ADMISSION_FLOOR
) -> Tensor:
    """Admission of features [n, d] into a queue: ``rule`` is "rule13" (the paper's (13): q_i > mean_j q(f_j),
    everything while the queue warms up) or "floor" (log q_i >= ``floor``; everything until sigma is measured).

    Returns a bool mask [n].  Callers combine it with the presence flag lambda (absent features never enqueue).
    """
    _check_features(features, stats.dim)
    if features.dim() != 2:
        raise ValueError(f"features must be [n, d], got shape {tuple(features.shape)}")
    if rule not in ADMISSION_RULES:
        raise ValueError(f"unknown admission rule {rule!r}; choose one of {', '.join(ADMISSION_RULES)}")
    warming_up = stats.warming_up if rule == "rule13" else not stats.has_spread
    if warming_up:
        return torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
    log_q = stats_log_quality(features.detach(), stats, floor=None)
    if rule == "floor":
        return log_q >= floor
    return log_q.clamp_min(LOG_QUALITY_FLOOR).exp() > stats.threshold.to(features.device).float()


class FeatureQueue(nn.Module):
    """FIFO queue Q of the last L accepted features of one modality, with cached statistics (all buffers).

    Buffers are saved in the model's state dict, so a checkpoint carries the queue and its statistics.
    """

    features: Tensor
    count: Tensor
    position: Tensor
    mean: Tensor
    sigma: Tensor
    threshold: Tensor

    def __init__(
        self,
        dim: int,
        capacity: int = DEFAULT_QUEUE_SIZE,
        rule: str = "rule13",
        floor: float = DEFAULT_ADMISSION_FLOOR,
    ) -> None:
        super().__init__()
        if dim < 1 or capacity < 1:
            raise ValueError(f"queue needs dim >= 1 and capacity >= 1, got dim={dim}, capacity={capacity}")
        if rule not in ADMISSION_RULES:
            raise ValueError(f"unknown admission rule {rule!r}; choose one of {', '.join(ADMISSION_RULES)}")
        self.dim = dim
        self.capacity = capacity
        self.rule = rule
        self.floor = floor
        self.register_buffer("features", torch.zeros(capacity, dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))  # next slot to overwrite
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("sigma", torch.tensor(SIGMA_EPS))
        self.register_buffer("threshold", torch.tensor(1.0))

    def __len__(self) -> int:
        return int(self.count)

    def contents(self) -> Tensor:
        """The queued features [n, d], oldest first."""
        n = len(self)
        if n < self.capacity:
            return self.features[:n]
        return torch.roll(self.features, shifts=-int(self.position), dims=0)

    def stats(self) -> QueueStats:
        return QueueStats(self.mean, self.sigma, self.threshold, len(self), self.capacity)

    @torch.no_grad()
    def push(self, features: Tensor) -> None:
        """Append features [n, d] (oldest evicted when full) and refresh the statistics; no rule applied."""
        _check_features(features, self.dim)
        features = features.detach().to(self.features)
        if features.shape[0] > self.capacity:
            features = features[-self.capacity :]
        n = features.shape[0]
        slots = (int(self.position) + torch.arange(n, device=self.features.device)) % self.capacity
        self.features[slots] = features
        self.position.fill_((int(self.position) + n) % self.capacity)
        self.count.fill_(min(self.capacity, len(self) + n))
        self._refresh()

    def admits(self, features: Tensor, stats: QueueStats | None = None) -> Tensor:
        """This queue's admission rule for features [n, d] against ``stats`` (default: its own)."""
        return passes_enqueue_rule(features, stats or self.stats(), self.rule, self.floor)

    @torch.no_grad()
    def enqueue(self, features: Tensor, present: Tensor | None = None) -> Tensor:
        """Apply the admission rule against the current statistics, push the accepted features, return the mask."""
        _check_features(features, self.dim)
        accepted = self.admits(features)
        if present is not None:
            accepted = accepted & present.to(device=accepted.device, dtype=torch.bool)
        if bool(accepted.any()):
            self.push(features[accepted])
        return accepted

    def _refresh(self) -> None:
        stats = queue_statistics(self.contents(), capacity=self.capacity)
        self.mean.copy_(stats.mean)
        self.sigma.copy_(stats.sigma)
        self.threshold.copy_(stats.threshold)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, capacity={self.capacity}, count={len(self)}, rule={self.rule}"
