"""Redis-backed DRF reference queues (issue 6): one shared feature queue per modality and model version.

The feature queues are the reference every quality score (9) and every recovery is measured against.  Keeping them
in Redis lets all workers of a consumer group share one reference that follows the live stream.

Layout, per modality ``m`` under ``{prefix}:refq:{<model_version>}:m:`` (one hash tag, so one cluster slot):

* ``features`` LIST of float32 blobs, oldest first, bounded at the capacity L;
* ``reference`` LIST, the checkpoint's queue (``reset`` returns to it, drift is measured against it);
* ``meta`` HASH: dim, capacity, version (bumped by every change of ``features``), generation (bumped by seed and
  reset: a discontinuity), and the checkpoint statistics ``ref_*``;
* ``stats`` HASH: mean (1), sigma (2), threshold of (13), count, tagged with the ``version``/``generation`` of the
  contents they were computed from;
* ``accepted:<window>`` counter of features taken in the current cap window (expires by itself).

Consistency: the hot path (:data:`APPEND_SCRIPT`, one EVALSHA per batch) appends, trims and bumps the version
atomically but does not recompute statistics (the threshold of (13) needs a pass over all L*d floats).  Whichever
worker refreshes recomputes them from the contents with :func:`core.distribution.queue_statistics` and writes them
back only if the version is unchanged (compare-and-set, :data:`WRITE_STATS_SCRIPT`).  So stored statistics always
equal a recomputation from the contents of the version they are tagged with.

Queue poisoning and what the caps do and do not protect against: docs/reference-queues.md.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
import redis
import torch
from pydantic import Field, SecretStr, model_validator
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry

from connectors.config import Section, read_secret_file, redact_url
from core.distribution import SIGMA_EPS, QueueStats, queue_statistics

if TYPE_CHECKING:
    from core.inference import Predictor

log = logging.getLogger(__name__)


class QueueMode(str, Enum):
    FROZEN = "frozen"
    ONLINE = "online"


class RedisSettings(Section):
    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    url_file: Path | None = None
    key_prefix: str = Field("postsense", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    mode: QueueMode = QueueMode.ONLINE
    refresh_interval_s: float = Field(5.0, gt=0)
    # Guard rail against queue poisoning: at most this many accepted features per modality per interval.
    max_accepted_per_interval: int = Field(256, ge=0)
    accept_interval_s: float = Field(60.0, gt=0)
    # Every Redis call on the hot path is bounded by this; the consumer never waits longer.
    op_timeout_s: float = Field(0.5, gt=0, le=30)
    reconnect_backoff_max_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _url_from_file(self) -> RedisSettings:
        if self.url_file is not None:
            secret = read_secret_file(self.url_file)
            assert secret is not None
            object.__setattr__(self, "url", secret)
        scheme = urlsplit(self.url.get_secret_value()).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"redis url must start with redis://, rediss:// or unix:// (got {scheme or 'none'}://)")
        return self

    def redacted_url(self) -> str:
        return redact_url(self.url.get_secret_value())


MODALITIES = ("image", "text")

# Reply codes of APPEND_SCRIPT, per modality.
APPEND_OK, APPEND_UNSEEDED, APPEND_STALE, APPEND_BAD_DIM = 0, 1, 2, 3

#: Appends proposed features to each modality's queue in one atomic step.  Every check happens before any write
#: (Redis does not roll a script back).  KEYS: per modality features, meta, counter.  ARGV: cap, counter ttl (ms),
#: then per modality: the generation the proposals were judged under, n, n float32 blobs.
#: Reply per modality: {code, taken, version, generation, length}.
APPEND_SCRIPT = """
local cap = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local plans = {}
local a = 3
for m = 0, #KEYS / 3 - 1 do
  local gen, n = ARGV[a], tonumber(ARGV[a + 1])
  local first = a + 2
  a = first + n
  local info = redis.call('HMGET', KEYS[3 * m + 2], 'dim', 'capacity', 'version', 'generation')
  local code, take = 0, 0
  if not info[1] then
    code = 1
  elseif info[4] ~= gen then
    code = 2
  else
    local width = tonumber(info[1]) * 4
    for i = first, first + n - 1 do
      if #ARGV[i] ~= width then code = 3 end
    end
    if code == 0 then
      local used = tonumber(redis.call('GET', KEYS[3 * m + 3]) or '0')
      take = math.min(n, math.max(0, cap - used))
    end
  end
  plans[m + 1] = {code, take, first, info}
end
local out = {}
for m = 0, #KEYS / 3 - 1 do
  local code, take, first, info = unpack(plans[m + 1])
  local version = tonumber(info[3] or '0')
  if code == 0 and take > 0 then
    for i = first, first + take - 1 do
      redis.call('RPUSH', KEYS[3 * m + 1], ARGV[i])
    end
    redis.call('LTRIM', KEYS[3 * m + 1], -tonumber(info[2]), -1)
    version = redis.call('HINCRBY', KEYS[3 * m + 2], 'version', 1)
    redis.call('INCRBY', KEYS[3 * m + 3], take)
    redis.call('PEXPIRE', KEYS[3 * m + 3], ttl)
  end
  out[m + 1] = {code, take, version, tonumber(info[4] or '0'), redis.call('LLEN', KEYS[3 * m + 1])}
end
return out
"""

#: Compare-and-set of one modality's statistics: written only if the contents are still at the given
#: version and generation.  KEYS: meta, stats.  ARGV: version, generation, mean, sigma, threshold, count, capacity.
WRITE_STATS_SCRIPT = """
local info = redis.call('HMGET', KEYS[1], 'version', 'generation')
if info[1] ~= ARGV[1] or info[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], 'version', ARGV[1], 'generation', ARGV[2], 'mean', ARGV[3], 'sigma', ARGV[4],
           'threshold', ARGV[5], 'count', ARGV[6], 'capacity', ARGV[7])
return 1
"""


class ReferenceQueueError(RuntimeError):
    """An administrative operation cannot proceed (not seeded, already seeded, mismatched shapes)."""


def connect(settings: RedisSettings) -> redis.Redis:
    """A client whose every call is bounded by ``op_timeout_s`` and never retried behind the caller's back.

    AUTH and TLS come from the URL: ``redis://user:pass@host:6379/0``, ``rediss://host:6380/0?ssl_ca_certs=ca.pem``.
    """
    timeout = settings.op_timeout_s
    return redis.Redis.from_url(
        settings.url.get_secret_value(),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        max_connections=8,
        client_name="postsense-reference-queues",
        maint_notifications_config=MaintNotificationsConfig(
            enabled=False
        ),  # a round trip per connect, unused
    )


def drift_sigmas(live: QueueStats, reference: QueueStats) -> float:
    """Distance of the live mean from the checkpoint's mean, in units of the checkpoint's sigma."""
    distance = float(torch.linalg.vector_norm(live.mean.float() - reference.mean.float()))
    return distance / max(float(reference.sigma), SIGMA_EPS)


def checkpoint_reference(predictor: Predictor) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The checkpoint's queue contents and capacities L, as ``seed`` takes them."""
    capacity = {m: stats.capacity for m, stats in predictor.reference_stats().items()}
    return {m: q.numpy() for m, q in predictor.checkpoint_queues().items()}, capacity


def _as_feature_matrix(features: Any, name: str, dim: int | None = None) -> np.ndarray:
    array = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name}: expected a float [n, d] feature matrix, got {array.dtype} {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name}: features have dimension {array.shape[1]}, the queue has {dim}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _encode_stats(stats: QueueStats) -> dict[str, bytes | str | int]:
    return {
        "mean": stats.mean.detach().cpu().float().numpy().tobytes(),
        "sigma": repr(float(stats.sigma)),
        "threshold": repr(float(stats.threshold)),
        "count": stats.count,
        "capacity": stats.capacity,
    }


def _decode_stats(fields: Mapping[bytes, bytes], prefix: str = "") -> QueueStats:
    def get(name: str) -> bytes:
        return fields[(prefix + name).encode()]

    return QueueStats(
        mean=torch.from_numpy(np.frombuffer(get("mean"), dtype=np.float32).copy()),
        sigma=torch.tensor(float(get("sigma")), dtype=torch.float32),
        threshold=torch.tensor(float(get("threshold")), dtype=torch.float32),
        count=int(get("count")),
        capacity=int(get("capacity")),
    )


def _rows(blobs: list[bytes], dim: int) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim).copy()


@dataclass(frozen=True)
class ModalityState:
    """What Redis holds for one modality at one instant (one MULTI/EXEC read)."""

    dim: int
    capacity: int
    version: int
    generation: int
    length: int
    reference: QueueStats  # the checkpoint queue's statistics
    stats: QueueStats | None  # stored statistics, None if missing or not tagged with the current contents
    features: np.ndarray | None = None  # [length, d] oldest first, when asked for
    reference_features: np.ndarray | None = None

    @property
    def tag(self) -> tuple[int, int]:
        return (self.generation, self.version)


@dataclass(frozen=True)
class AppendResult:
    code: int
    taken: int
    version: int
    generation: int
    length: int


class QueueStore:
    """Stateless access to the queues of one model version: the keys, the scripts, the atomic operations."""

    def __init__(self, client: redis.Redis, key_prefix: str, model_version: str) -> None:
        if not model_version:
            raise ValueError("model_version must not be empty")
        self.client = client
        self.model_version = model_version
        self.base = f"{key_prefix}:refq:{{{model_version}}}"
        self._append = client.register_script(APPEND_SCRIPT)
        self._write_stats = client.register_script(WRITE_STATS_SCRIPT)

    def key(self, modality: str, part: str) -> str:
        return f"{self.base}:{modality}:{part}"

    # --- reads -------------------------------------------------------------------------------------------------

    def read(self, contents: bool | tuple[str, ...] = False) -> dict[str, ModalityState] | None:
        """One consistent read of every modality (one round trip); None if the queues are not seeded.

        ``contents`` asks for the queued features too (True: every modality, or a tuple of modalities).
        """
        wanted = MODALITIES if contents is True else (contents or ())
        pipe = self.client.pipeline(transaction=True)
        for m in MODALITIES:
            pipe.hgetall(self.key(m, "meta"))
            pipe.hgetall(self.key(m, "stats"))
            pipe.llen(self.key(m, "features"))
            if m in wanted:
                pipe.lrange(self.key(m, "features"), 0, -1)
                pipe.lrange(self.key(m, "reference"), 0, -1)
        replies = iter(pipe.execute())
        states: dict[str, ModalityState] = {}
        for m in MODALITIES:
            meta, stored, length = next(replies), next(replies), next(replies)
            blobs, reference_blobs = (next(replies), next(replies)) if m in wanted else (None, None)
            if not meta:
                return None
            dim, version, generation = int(meta[b"dim"]), int(meta[b"version"]), int(meta[b"generation"])
            tagged = (int(stored[b"version"]), int(stored[b"generation"])) if stored else None
            states[m] = ModalityState(
                dim=dim,
                capacity=int(meta[b"capacity"]),
                version=version,
                generation=generation,
                length=int(length),
                reference=_decode_stats(meta, "ref_"),
                stats=_decode_stats(stored) if tagged == (version, generation) else None,
                features=None if blobs is None else _rows(blobs, dim),
                reference_features=None if reference_blobs is None else _rows(reference_blobs, dim),
            )
        return states

    # --- the hot path ------------------------------------------------------------------------------------------

    def append(
        self,
        proposals: Mapping[str, np.ndarray],
        generations: Mapping[str, int],
        cap: int,
        window_ms: int,
    ) -> dict[str, AppendResult]:
        """Append float32 feature rows per modality, at most ``cap`` per modality per cap window; one EVALSHA."""
        window = int(time.time() * 1000) // window_ms
        keys: list[str] = []
        args: list[Any] = [cap, 2 * window_ms]
        order = [m for m in MODALITIES if m in proposals]
        for m in order:
            rows = proposals[m]
            keys += [self.key(m, "features"), self.key(m, "meta"), self.key(m, f"accepted:{window}")]
            args += [generations[m], len(rows), *(row.tobytes() for row in rows)]
        reply = self._append(keys=keys, args=args)
        return {m: AppendResult(*(int(x) for x in r)) for m, r in zip(order, reply, strict=True)}

    def write_stats(self, modality: str, stats: QueueStats, version: int, generation: int) -> bool:
        """Store statistics computed from the contents at (generation, version), unless they changed since."""
        encoded = _encode_stats(stats)
        args = [version, generation, encoded["mean"], encoded["sigma"], encoded["threshold"]]
        args += [encoded["count"], encoded["capacity"]]
        return bool(
            self._write_stats(keys=[self.key(modality, "meta"), self.key(modality, "stats")], args=args)
        )

    # --- administration ----------------------------------------------------------------------------------------

    def seed(
        self,
        queues: Mapping[str, Any],
        capacity: Mapping[str, int] | int | None = None,
        reference: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        source: str = "",
    ) -> bool:
        """Write the queues (and the checkpoint reference, default: the queues themselves) atomically.

        Returns False, writing nothing, when the queues already exist and ``overwrite`` is False.  Versions and
        generations keep counting up across a re-seed, so every worker sees the change.
        """
        contents = self._check_queues(queues, "queues")
        references = contents if reference is None else self._check_queues(reference, "reference")
        if capacity is None:
            capacities = {m: len(contents[m]) for m in MODALITIES}
        elif isinstance(capacity, int):
            capacities = dict.fromkeys(MODALITIES, capacity)
        else:
            capacities = {m: int(capacity[m]) for m in MODALITIES}
        for m in MODALITIES:
            if references[m].shape[1] != contents[m].shape[1]:
                raise ValueError(f"{m}: reference and queue feature dimensions differ")
            if capacities[m] < 1 or max(len(contents[m]), len(references[m])) > capacities[m]:
                raise ValueError(
                    f"{m}: {len(contents[m])} features do not fit the queue capacity {capacities[m]} "
                    "(an empty queue needs an explicit capacity)"
                )
        stats = {m: queue_statistics(torch.from_numpy(contents[m]), capacities[m]) for m in MODALITIES}
        ref_stats = {m: queue_statistics(torch.from_numpy(references[m]), capacities[m]) for m in MODALITIES}
        metas = [self.key(m, "meta") for m in MODALITIES]
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(*metas)
                    old = {m: pipe.hmget(self.key(m, "meta"), "version", "generation") for m in MODALITIES}
                    if any(v[0] is not None for v in old.values()) and not overwrite:
                        pipe.reset()
                        return False
                    pipe.multi()
                    for m in MODALITIES:
                        version = int(old[m][0] or 0) + 1
                        # A first seed starts from the clock, so a queue re-created after Redis lost its data
                        # never repeats a (generation, version) tag that a worker still caches.
                        generation = max(int(old[m][1] or 0) + 1, int(time.time() * 1000))
                        self._queue_replace(pipe, m, contents[m], "features")
                        self._queue_replace(pipe, m, references[m], "reference")
                        pipe.delete(self.key(m, "meta"), self.key(m, "stats"))
                        ref = {f"ref_{k}": v for k, v in _encode_stats(ref_stats[m]).items()}
                        pipe.hset(
                            self.key(m, "meta"),
                            mapping={
                                "dim": contents[m].shape[1],
                                "capacity": capacities[m],
                                "version": version,
                                "generation": generation,
                                "seeded_at": repr(time.time()),
                                "source": source,
                                **ref,
                            },
                        )
                        pipe.hset(
                            self.key(m, "stats"),
                            mapping={"version": version, "generation": generation, **_encode_stats(stats[m])},
                        )
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def reset(self) -> dict[str, int]:
        """Return every queue to the checkpoint reference; returns the new generation per modality."""
        metas = [self.key(m, "meta") for m in MODALITIES]
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(*metas, *(self.key(m, "reference") for m in MODALITIES))
                    metas_now = {m: pipe.hgetall(self.key(m, "meta")) for m in MODALITIES}
                    if not all(metas_now.values()):
                        pipe.reset()
                        raise ReferenceQueueError(f"no reference queues under {self.base}: seed them first")
                    references = {m: pipe.lrange(self.key(m, "reference"), 0, -1) for m in MODALITIES}
                    pipe.multi()
                    generations = {}
                    for m, meta in metas_now.items():
                        version, generation = int(meta[b"version"]) + 1, int(meta[b"generation"]) + 1
                        generations[m] = generation
                        pipe.delete(self.key(m, "features"))
                        if references[m]:
                            pipe.rpush(self.key(m, "features"), *references[m])
                        pipe.hset(self.key(m, "meta"), mapping={"version": version, "generation": generation})
                        stored = {k.decode()[4:]: v for k, v in meta.items() if k.startswith(b"ref_")}
                        pipe.hset(
                            self.key(m, "stats"),
                            mapping={"version": version, "generation": generation, **stored},
                        )
                    pipe.execute()
                    return generations
                except redis.WatchError:
                    continue

    def _queue_replace(self, pipe: Any, modality: str, rows: np.ndarray, part: str) -> None:
        pipe.delete(self.key(modality, part))
        if len(rows):
            pipe.rpush(self.key(modality, part), *(row.tobytes() for row in rows))

    @staticmethod
    def _check_queues(queues: Mapping[str, Any], name: str) -> dict[str, np.ndarray]:
        missing = [m for m in MODALITIES if m not in queues]
        unknown = sorted(set(queues) - set(MODALITIES))
        if missing or unknown:
            raise ValueError(
                f"{name} need exactly the modalities {MODALITIES} (missing {missing}, unknown {unknown})"
            )
        out = {m: _as_feature_matrix(queues[m], f"{name}[{m!r}]") for m in MODALITIES}
        for m, rows in out.items():
            if not np.isfinite(rows).all():
                raise ValueError(f"{name}[{m!r}] contains NaN or infinity")
        return out


@dataclass(frozen=True)
class _Cache:
    """Statistics, checkpoint statistics and the (generation, version) they describe: swapped as one object."""

    stats: dict[str, QueueStats]
    reference: dict[str, QueueStats]
    tags: dict[str, tuple[int, int]]


class ReferenceQueues:
    """A worker's view of the shared reference queues: cached statistics, batched proposals, outage handling.

    ``stats()`` never touches Redis: a background thread refreshes the cache every ``refresh_interval_s`` (the
    contents change with every accepted batch, so a refresh per version would cost a full read per batch), at
    once when another worker re-seeds or resets (a generation change seen in a reply), and reconnects with
    exponential backoff after an outage.  ``propose()`` costs one round trip, bounded by ``op_timeout_s``, and
    none at all while Redis is known to be down (the proposals are then dropped, never queued).
    """

    def __init__(self, redis_settings: RedisSettings, model_version: str, metrics: Any = None) -> None:
        self.settings = redis_settings
        self.online = redis_settings.mode == QueueMode.ONLINE
        self.store = QueueStore(connect(redis_settings), redis_settings.key_prefix, model_version)
        self.metrics = metrics
        self.dropped_updates = 0  # features not offered: Redis down, queues unusable, or not finite
        self.capped_updates = 0  # features refused by the per-interval cap
        self._lock = threading.Lock()
        self._cache: _Cache | None = None
        self._available: bool | None = None  # None: not known yet
        self._problem_logged = False
        self._fallback: tuple[Mapping[str, Any], Mapping[str, int] | int | None] | None = None
        self._proposed = dict.fromkeys(MODALITIES, 0)
        self._present = dict.fromkeys(MODALITIES, 0)
        self._wake = threading.Event()
        self._closed = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="reference-queues", daemon=True)
        self._thread.start()

    # --- runtime API -------------------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """Whether the last Redis operation succeeded."""
        return bool(self._available)

    def stats(self) -> dict[str, QueueStats] | None:
        """The cached statistics per modality (None before the first successful read).

        The same dict object is returned until the statistics change, so a caller can swap them into the
        predictor only when ``stats() is not last``.  Never touches Redis.
        """
        cache = self._cache
        return None if cache is None else cache.stats

    def reference_stats(self) -> dict[str, QueueStats] | None:
        """The checkpoint queues' statistics, the origin of the drift metric."""
        cache = self._cache
        return None if cache is None else cache.reference

    def drift(self) -> dict[str, float]:
        """Per modality: distance of the live mean from the checkpoint's, in checkpoint sigmas."""
        cache = self._cache
        if cache is None:
            return {}
        return {m: drift_sigmas(cache.stats[m], cache.reference[m]) for m in MODALITIES}

    def seed(
        self,
        queues: Mapping[str, Any],
        overwrite: bool = False,
        capacity: Mapping[str, int] | int | None = None,
    ) -> bool:
        """Seed the queues from the checkpoint's (False if they already exist and ``overwrite`` is False).

        An online worker remembers them and seeds them when it finds Redis empty: after a restart without
        persistence, or when Redis was down at this call (which then raises the RedisError).
        """
        try:
            seeded = self.store.seed(queues, capacity, overwrite=overwrite, source="worker")
        except redis.RedisError as exc:
            self._fallback = (
                queues,
                capacity,
            )  # validated already: the refresher seeds them once Redis answers
            self._mark_unavailable(exc)
            raise
        self._fallback = (queues, capacity)
        self.refresh()
        return seeded

    def propose(
        self,
        features: Mapping[str, Any],
        accepted: Mapping[str, Any],
        present: Mapping[str, Any] | None = None,
    ) -> None:
        """Offer a batch's features [B, d] whose ``accepted`` mask [B] passed the model's admission rule.

        ``present`` (default: rows that are not all zero) feeds the acceptance-ratio metric.  Frozen mode, an
        outage, a generation change or the cap drop proposals; non-finite rows are never offered.  Only a
        malformed argument raises (ValueError).
        """
        cache = self._cache
        proposals: dict[str, np.ndarray] = {}
        dropped = 0
        for m, value in features.items():
            if m not in MODALITIES:
                raise ValueError(f"unknown modality {m!r} (expected one of {MODALITIES})")
            rows = _as_feature_matrix(
                value, f"features[{m!r}]", None if cache is None else cache.stats[m].dim
            )
            mask = self._mask(accepted, m, rows.shape[0], "accepted")
            shown = (
                rows.any(axis=1) if present is None or m not in present else self._mask(present, m, len(rows))
            )
            finite = np.isfinite(rows).all(axis=1)
            mask &= shown
            dropped += int((mask & ~finite).sum())
            mask &= finite
            with self._lock:
                self._proposed[m] += int(mask.sum())
                self._present[m] += int(shown.sum())
            if mask.any():
                proposals[m] = rows[mask]
        self.dropped_updates += dropped
        if not self.online or not proposals:
            return
        count = sum(len(r) for r in proposals.values())
        if not self._available or cache is None or self._closed.is_set():
            self.dropped_updates += count
            return
        generations = {m: cache.tags[m][0] for m in proposals}
        window_ms = int(self.settings.accept_interval_s * 1000)
        try:
            results = self.store.append(
                proposals, generations, self.settings.max_accepted_per_interval, window_ms
            )
        except redis.RedisError as exc:
            self.dropped_updates += count
            self._mark_unavailable(exc)
            return
        for m, result in results.items():
            if result.code == APPEND_OK:
                self.capped_updates += len(proposals[m]) - result.taken
                self._metric(m, accepted=result.taken, queue_length=result.length)
                continue
            self.dropped_updates += len(proposals[m])
            if result.code == APPEND_BAD_DIM:
                log.error(
                    "reference queue %s refused features of the wrong dimension",
                    self.store.key(m, "features"),
                )
            self._wake.set()  # unseeded or another generation: refresh (and re-seed) now

    def refresh(self) -> bool:
        """Reload the statistics from Redis now (the background thread calls this); False if that failed."""
        try:
            states = self.store.read()
            if states is None and self.online and self._fallback is not None:
                log.warning(
                    "reference queues under %s are gone (Redis lost its data?): seeding them again",
                    self.store.base,
                )
                self.store.seed(*self._fallback, source="worker re-seed")
                states = self.store.read()
            if states is None:
                self._mark_available()
                self._log_problem(
                    "no reference queues under %s: the checkpoint's statistics stay in use until "
                    "`postsense queues seed` runs",
                    self.store.base,
                )
                return True
            stale = tuple(m for m, s in states.items() if s.stats is None and not self._cached(m, s.tag))
            if stale:
                states.update(self._recompute(stale))
            self._install(states)
            self._mark_available()
            self._problem_logged = False
            return True
        except redis.RedisError as exc:
            self._mark_unavailable(exc)
            return False
        except (KeyError, ValueError) as exc:  # damaged keys: keep serving the cache, write nothing
            self._log_problem(
                "reference queues under %s are damaged (%r): keeping the cached statistics",
                self.store.base,
                exc,
            )
            return False

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.settings.op_timeout_s * 4 + 1)
        self.store.client.close()

    def __enter__(self) -> ReferenceQueues:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------------------------

    @staticmethod
    def _mask(masks: Mapping[str, Any], m: str, rows: int, name: str = "present") -> np.ndarray:
        mask = np.asarray(masks[m], dtype=bool).reshape(-1) if m in masks else None
        if mask is None or mask.shape[0] != rows:
            raise ValueError(f"{name}[{m!r}] must be a bool mask with one entry per feature row ({rows})")
        return mask.copy()

    def _cached(self, modality: str, tag: tuple[int, int]) -> bool:
        cache = self._cache
        return cache is not None and cache.tags[modality] == tag

    def _recompute(self, modalities: tuple[str, ...]) -> dict[str, ModalityState]:
        """Statistics from the contents (queue_statistics), stored back by compare-and-set unless frozen."""
        states = self.store.read(contents=modalities)
        if states is None:
            return {}
        out = {}
        for m in modalities:
            state = states[m]
            assert state.features is not None
            stats = queue_statistics(torch.from_numpy(state.features), state.capacity)
            if self.online:
                self.store.write_stats(m, stats, state.version, state.generation)
            out[m] = replace(state, stats=stats, features=None, reference_features=None)
        return out

    def _install(self, states: dict[str, ModalityState]) -> None:
        cache = self._cache
        if any(not self._cached(m, s.tag) for m, s in states.items()):
            stats = {
                m: s.stats if s.stats is not None else cache.stats[m]  # type: ignore[union-attr]
                for m, s in states.items()
            }
            self._cache = _Cache(
                stats, {m: s.reference for m, s in states.items()}, {m: s.tag for m, s in states.items()}
            )
        with self._lock:
            ratios = {m: self._proposed[m] / self._present[m] for m in MODALITIES if self._present[m]}
            self._proposed = dict.fromkeys(MODALITIES, 0)
            self._present = dict.fromkeys(MODALITIES, 0)
        drift = self.drift()
        for m, state in states.items():
            self._metric(
                m, queue_length=state.length, acceptance_ratio=ratios.get(m), drift_sigmas=drift.get(m)
            )

    def _run(self) -> None:
        first = min(0.2, self.settings.reconnect_backoff_max_s)
        backoff = first
        while not self._closed.is_set():
            if self._available:
                self._wake.wait(self.settings.refresh_interval_s)
            else:
                self._closed.wait(backoff * random.uniform(0.5, 1.0))
            self._wake.clear()
            if self._closed.is_set():
                break
            backoff = first if self.refresh() else min(backoff * 2, self.settings.reconnect_backoff_max_s)

    def _log_problem(self, message: str, *args: object) -> None:
        if not self._problem_logged:
            log.warning(message, *args)
            self._problem_logged = True

    def _mark_available(self) -> None:
        with self._lock:
            was, self._available = self._available, True
        if was is False:
            log.info("Redis at %s is back: reference queues are updated again", self.settings.redacted_url())
        if was is not True and self.metrics is not None:
            self.metrics.redis_up.set(1)

    def _mark_unavailable(self, exc: Exception) -> None:
        with self._lock:
            was, self._available = self._available, False
        self._wake.set()  # the refresher switches from its interval to reconnecting with backoff
        if was is not False:
            log.warning(
                "Redis at %s unavailable (%s): serving the last cached reference statistics, dropping queue "
                "updates, reconnecting with backoff",
                self.settings.redacted_url(),
                exc,
            )
            if self.metrics is not None:
                self.metrics.redis_up.set(0)

    def _metric(self, modality: str, **values: Any) -> None:
        if self.metrics is not None:
            self.metrics.set_reference(modality, **values)
