"""The Redis side of the DRF reference queues: key layout, Lua scripts, and atomic reads and writes.

Kept apart from the worker's cached view (``connectors.reference_queues``) because this part is stateless:
the ``postsense queues`` command, the worker and the tests all use it directly, and every consistency rule
lives here, in one place.

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
worker refreshes recomputes them from the contents with :func:`core.drf.queue_statistics` and writes them
back only if the version is unchanged (compare-and-set, :data:`WRITE_STATS_SCRIPT`).  So stored statistics always
equal a recomputation from the contents of the version they are tagged with.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
import torch
from redis.typing import EncodableT, FieldT

from core.contracts import MODALITIES
from core.drf import QueueStats, queue_statistics

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


def as_feature_matrix(features: Any, name: str, dim: int | None = None) -> np.ndarray:
    """``features`` (tensor or array) as a contiguous float32 [n, d] matrix, or a ValueError naming ``name``."""
    array = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name}: expected a float [n, d] feature matrix, got {array.dtype} {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name}: features have dimension {array.shape[1]}, the queue has {dim}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _encode_stats(stats: QueueStats, prefix: str = "") -> dict[FieldT, EncodableT]:
    """Hash fields of ``stats`` (``_decode_stats`` reads them back); the checkpoint's carry the prefix ``ref_``."""
    return {
        f"{prefix}mean": stats.mean.detach().cpu().float().numpy().tobytes(),
        f"{prefix}sigma": repr(float(stats.sigma)),
        f"{prefix}threshold": repr(float(stats.threshold)),
        f"{prefix}count": stats.count,
        f"{prefix}capacity": stats.capacity,
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
class QueueState:
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
    """One modality's reply to APPEND_SCRIPT: a reply code, the rows taken, and the queue after the append."""

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

    def read(self, contents: bool | tuple[str, ...] = False) -> dict[str, QueueState] | None:
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
        states: dict[str, QueueState] = {}
        for m in MODALITIES:
            meta, stored, length = next(replies), next(replies), next(replies)
            blobs, reference_blobs = (next(replies), next(replies)) if m in wanted else (None, None)
            if not meta:
                return None
            dim, version, generation = int(meta[b"dim"]), int(meta[b"version"]), int(meta[b"generation"])
            tagged = (int(stored[b"version"]), int(stored[b"generation"])) if stored else None
            states[m] = QueueState(
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
        capacities = self._seed_capacities(contents, references, capacity)
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
                        meta = {
                            "dim": contents[m].shape[1],
                            "capacity": capacities[m],
                            "version": version,
                            "generation": generation,
                            "seeded_at": repr(time.time()),
                            "source": source,
                            **_encode_stats(ref_stats[m], "ref_"),
                        }
                        pipe.hset(self.key(m, "meta"), mapping=meta)
                        tag: dict[FieldT, EncodableT] = {"version": version, "generation": generation}
                        pipe.hset(self.key(m, "stats"), mapping={**tag, **_encode_stats(stats[m])})
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    @staticmethod
    def _seed_capacities(
        contents: Mapping[str, Any], references: Mapping[str, Any], capacity: Mapping[str, int] | int | None
    ) -> dict[str, int]:
        """Each modality's capacity (default: its contents' length), checked to hold its queue and reference."""
        if capacity is None:
            capacities: dict[str, int] = {m: len(contents[m]) for m in MODALITIES}
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
        return capacities

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
                    generations: dict[str, int] = {}
                    for m, meta in metas_now.items():
                        version, generation = int(meta[b"version"]) + 1, int(meta[b"generation"]) + 1
                        generations[m] = generation
                        pipe.delete(self.key(m, "features"))
                        if references[m]:
                            pipe.rpush(self.key(m, "features"), *references[m])
                        pipe.hset(self.key(m, "meta"), mapping={"version": version, "generation": generation})
                        stored: dict[FieldT, EncodableT] = {
                            k[4:]: v
                            for k, v in meta.items()
                            if isinstance(k, bytes) and k.startswith(b"ref_")
                        }
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
        out: dict[str, np.ndarray] = {m: as_feature_matrix(queues[m], f"{name}[{m!r}]") for m in MODALITIES}
        for m, rows in out.items():
            if not np.isfinite(rows).all():
                raise ValueError(f"{name}[{m!r}] contains NaN or infinity")
        return out
