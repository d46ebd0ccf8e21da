"""ONNX Runtime on CPU: is it installed, how many threads, one shared arena, and a session per exported encoder.

A leaf of the encoders package: export (core/encoders/export.py) and the runtime switch (core/encoders/switch.py)
build on it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.encoders.base import EncoderUnavailableError

RUNTIMES = ("torch", "onnxruntime")
PRECISIONS = ("fp32", "int8")


def cpu_threads() -> int:
    """The cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a pod's CPU limit).

    ONNX Runtime's default is every core of the host, which on a pod limited to fewer cores oversubscribes it.
    """
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


#: The serving runtime setting that picks ONNX Runtime for every encoder that can switch, when it is installed:
#: CPU inference of a frozen encoder is faster there, with features within float tolerance of torch.
AUTO_RUNTIME = "auto"


def auto_runtime() -> str | None:
    """What ``AUTO_RUNTIME`` means on this machine: "onnxruntime" when installed, else None (the checkpoint's)."""
    return "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else None


def served_by_onnx(runtime: str, precision: str) -> bool:
    """int8 exists only in ONNX Runtime, so it implies that runtime."""
    return runtime == "onnxruntime" or precision == "int8"


def require_onnxruntime(what: str, export: bool = False) -> Any:
    """The onnxruntime module; ``export`` also needs the onnx package (the exporter and the quantiser)."""
    try:
        if export:
            import onnx  # noqa: F401  (imported for its availability: torch.onnx.export needs it)
        import onnxruntime
    except ImportError as exc:
        raise EncoderUnavailableError(
            f"{what} needs the packages onnxruntime and onnx (pip install 'postsense[onnx]')"
        ) from exc
    return onnxruntime


_arena_lock = threading.Lock()


@functools.cache
def _register_shared_arena() -> None:
    onnxruntime = require_onnxruntime("ONNX Runtime inference")
    cpu = onnxruntime.OrtMemoryInfo(
        "Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, onnxruntime.OrtMemType.DEFAULT
    )
    defaults = onnxruntime.OrtArenaCfg(0, -1, -1, -1)  # ONNX Runtime's own arena settings
    onnxruntime.create_and_register_allocator(cpu, defaults)


def shared_cpu_arena() -> None:
    """One CPU arena for every session of the process, registered once. An arena keeps its peak for good, and the
    encoders never run at once, so a shared one holds the larger peak instead of the sum (BENCHMARKS.md, memory)."""
    with _arena_lock:
        _register_shared_arena()


class OnnxSession:
    """One exported encoder in ONNX Runtime on CPU, with intra-op threads for this machine (``cpu_threads``), its
    activations in the process's shared arena."""

    def __init__(self, path: Path, precision: str, threads: int | None = None) -> None:
        onnxruntime = require_onnxruntime("ONNX Runtime inference")
        shared_cpu_arena()
        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.use_env_allocators", "1")
        # torch's count follows OMP_NUM_THREADS / set_num_threads (one knob for both runtimes); the quota caps it.
        options.intra_op_num_threads = threads or min(torch.get_num_threads(), cpu_threads())
        options.inter_op_num_threads = 1  # the graphs are sequential: a second pool would only hold memory
        options.log_severity_level = 3  # errors only
        # Idle intra-op threads sleep instead of spinning: the service decodes the next batch on the same cores
        # meanwhile (BENCHMARKS.md has the end-to-end figures with and without).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.precision = precision
        self.path = path
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: Mapping[str, Tensor]) -> Tensor:
        arrays = {name: feeds[name].detach().contiguous().numpy() for name in self.inputs}
        return torch.from_numpy(self.session.run(None, arrays)[0])
