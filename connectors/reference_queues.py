"""A worker's view of the Redis-backed DRF reference queues, and the settings that configure them.

The feature queues are the reference every quality score (9) and every recovery is measured against.  Keeping them
in Redis lets all workers of a consumer group share one reference that follows the live stream.  The keys, the
scripts and every atomic operation are in ``connectors.queue_store``; this module is what a worker adds on top:
statistics cached in memory (the hot path never waits for Redis), proposals batched into one round trip, a
background refresher, and outage handling (serve the last statistics, drop updates, reconnect with backoff).

Queue poisoning and what the caps do and do not protect against: docs/reference-queues.md.
"""

from __future__ import annotations

import logging
import random
import threading
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
from connectors.queue_store import (
    APPEND_BAD_DIM,
    APPEND_OK,
    QueueState,
    QueueStore,
    as_feature_matrix,
)
from core.contracts import MODALITIES
from core.drf import SIGMA_EPS, QueueStats, queue_statistics

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
    # Score quality against the checkpoint's own statistics, never the shared queues' live ones, so `postsense
    # score` on the same posts gives the same labels and probabilities (an exact shadow test).  The queues are
    # still read (drift metric) and, online, still offered this worker's accepted features.
    pin_to_checkpoint: bool = False

    @model_validator(mode="after")
    def _url_from_file(self) -> RedisSettings:
        if self.url_file is not None:
            secret = read_secret_file(self.url_file)
            assert secret is not None
            object.__setattr__(self, "url", secret)
        scheme = urlsplit(self.url.get_secret_value()).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"redis url must start with redis://, rediss:// or unix:// (got {scheme or 'none'}://)"
            )
        return self

    def redacted_url(self) -> str:
        return redact_url(self.url.get_secret_value())


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
        # Maintenance notifications cost a round trip per connect, and nothing here uses them.
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )


def drift_sigmas(live: QueueStats, reference: QueueStats) -> float:
    """Distance of the live mean from the checkpoint's mean, in units of the checkpoint's sigma."""
    distance = float(torch.linalg.vector_norm(live.mean.float() - reference.mean.float()))
    return distance / max(float(reference.sigma), SIGMA_EPS)


def checkpoint_reference(predictor: Predictor) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The checkpoint's queue contents and capacities L, as ``seed`` takes them."""
    capacity = {m: stats.capacity for m, stats in predictor.reference_stats().items()}
    return {m: q.numpy() for m, q in predictor.checkpoint_queues().items()}, capacity


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
        self.pinned = redis_settings.pin_to_checkpoint
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
        # An online worker's caller seeds the queues right after this first look (``open_reference_queues``), so
        # only a frozen one says here that there are none; an online one says so at its first background refresh
        # if they are still absent then.
        self._refresh(announce_unseeded=not self.online)
        self._thread = threading.Thread(target=self._run, name="reference-queues", daemon=True)
        self._thread.start()
        if self.pinned:
            log.info(
                "quality is scored against the checkpoint's own statistics (redis.pin_to_checkpoint); the shared "
                "queues under %s still give the drift metric (and, online, still take this worker's features)",
                self.store.base,
            )

    # --- runtime API -------------------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """Whether the last Redis operation succeeded."""
        return bool(self._available)

    def stats(self) -> dict[str, QueueStats] | None:
        """The statistics to score against: the cached ones per modality; None before the first successful read,
        and always when pinned (``pin_to_checkpoint``), so the predictor keeps the checkpoint's own.

        The same dict object is returned until the statistics change, so a caller can swap them into the
        predictor only when ``stats() is not last``.  Never touches Redis.
        """
        cache = self._cache
        return None if cache is None or self.pinned else cache.stats

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
            # Validated already: the refresher seeds them once Redis answers.
            self._fallback = (queues, capacity)
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
            rows = as_feature_matrix(value, f"features[{m!r}]", None if cache is None else cache.stats[m].dim)
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
        return self._refresh(announce_unseeded=True)

    def _refresh(self, announce_unseeded: bool) -> bool:
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
                if announce_unseeded:
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

    def _recompute(self, modalities: tuple[str, ...]) -> dict[str, QueueState]:
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

    def _install(self, states: dict[str, QueueState]) -> None:
        cache = self._cache
        if any(not self._cached(m, s.tag) for m, s in states.items()):
            stats: dict[str, QueueStats] = {}
            for m, s in states.items():
                if s.stats is not None:
                    stats[m] = s.stats
                else:  # refresh() recomputed all but the modalities whose tag the cache holds
                    assert cache is not None
                    stats[m] = cache.stats[m]
            self._cache = _Cache(
                stats, {m: s.reference for m, s in states.items()}, {m: s.tag for m, s in states.items()}
            )
        with self._lock:
            ratios: dict[str, float] = {
                m: self._proposed[m] / self._present[m] for m in MODALITIES if self._present[m]
            }
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
