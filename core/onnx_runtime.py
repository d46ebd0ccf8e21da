"""CPU inference of a frozen encoder through ONNX Runtime: export, on-disk cache, sessions and the runtime switch.

An encoder exported once (and for int8 quantised, core/quantise.py) is a file keyed by its weights; serving loads
the file. Two ways to use it:

* ``OnnxSwitch`` on a torch encoder: CPU inference goes through the file of the current weights, exported on first
  use; training, autograd and GPU inputs keep the torch path.
* inference only (``OnnxSwitch`` with ``onnx_only``): the encoder has no torch network at all; loading a checkpoint
  only hashes its weights to find the file. This is how ``serve`` runs on CPU: a torch copy of both encoders, the
  tracer and the quantiser cost a serving process ~0.6 GiB of RSS it never uses (BENCHMARKS.md, memory).

Files are made at build time (``python -m core.encoders CHECKPOINT --precision int8`` writes them next to the
checkpoint); a serving process that finds none exports in process, with a warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.encoder_base import EncoderUnavailableError

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime")
PRECISIONS = ("fp32", "int8")
#: Where exported (and quantised) ONNX models are kept, keyed by weights, precision and library versions.
ONNX_CACHE_ENV = "POSTSENSE_ONNX_CACHE"
#: Bumped when what goes into an exported file changes (export arguments, quantisation settings).
ONNX_RECIPE = 4


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


def onnx_cache_dir() -> Path:
    return Path(os.environ.get(ONNX_CACHE_ENV) or Path.home() / ".cache" / "postsense" / "onnx")


def onnx_dir_for(checkpoint: str | Path) -> Path:
    """Where the build step puts a checkpoint's exported encoders: ``<checkpoint>.onnx/``, beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".onnx")


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


@dataclass(frozen=True)
class OnnxExport:
    """How to export one encoder: the module, an example input (with padding, for texts), names, dynamic axes.

    ``weights`` is the encoder's state dict (the file's key): a checkpoint holds the same names and bytes, so an
    inference-only load finds the file without building the module.
    """

    kind: str
    module: nn.Module
    weights: Mapping[str, Tensor]
    example: dict[str, Tensor]
    output: str
    dynamic_axes: dict[str, dict[int, str]]
    # int8: yields calibration feeds (static quantisation); None means dynamic quantisation.
    calibration: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None
    calibration_id: str = ""


def onnx_file_name(kind: str, precision: str, calibration_id: str, weights: Mapping[str, Tensor]) -> str:
    """``<kind>-<precision>-<key>.onnx``, the key a hash of the weights' names and bytes, the recipe (with the
    calibration set) and ONNX Runtime's release, whose quantiser makes the int8 files.

    Not torch's version: a file is the same network whichever torch traced it (the export arguments are the
    recipe's), so files made on a training machine's CUDA torch serve under the CPU image's torch.
    """
    onnxruntime = require_onnxruntime(f"the {kind} encoder's ONNX Runtime path")
    digest = hashlib.sha256(
        json.dumps([ONNX_RECIPE, kind, precision, calibration_id, onnxruntime.__version__]).encode()
    )
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(
            weights[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return f"{kind}-{precision}-{digest.hexdigest()[:20]}.onnx"


def onnx_model_file(spec: OnnxExport, precision: str, directory: Path | None = None) -> Path:
    """The ONNX file of ``spec`` at ``precision`` in ``directory`` (default: the cache), exported on a miss.

    Written atomically, so concurrent processes at worst export twice.
    """
    require_onnxruntime(f"the {spec.kind} encoder's ONNX export", export=True)
    path = (directory or onnx_cache_dir()) / onnx_file_name(
        spec.kind, precision, spec.calibration_id, spec.weights
    )
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        exported = Path(tmp) / "fp32.onnx"
        # Traced on normal (non-inference) tensors: the first call usually comes from inside inference_mode. The
        # tracer's warnings concern data-dependent control flow; the test against torch is what guards it.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            example = {k: v.clone() for k, v in spec.example.items()}
            torch.onnx.export(
                spec.module.eval(),
                tuple(example.values()),
                str(exported),
                input_names=list(example),
                output_names=[spec.output],
                dynamic_axes={**spec.dynamic_axes, spec.output: {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        if precision == "int8":
            from core.quantise import quantise

            exported = quantise(exported, spec)
        os.replace(exported, path)
    return path


_arena_lock = threading.Lock()


@functools.cache
def _register_shared_arena() -> None:
    onnxruntime = require_onnxruntime("ONNX Runtime inference")
    cpu = onnxruntime.OrtMemoryInfo(
        "Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, onnxruntime.OrtMemType.DEFAULT
    )
    onnxruntime.create_and_register_allocator(
        cpu, onnxruntime.OrtArenaCfg(0, -1, -1, -1)
    )  # ONNX Runtime's defaults


def shared_cpu_arena() -> None:
    """One CPU arena for every session of the process, registered once. An arena keeps its peak for good, and the
    encoders never run at once, so a shared one holds the larger peak instead of the sum (ONNX Runtime alone,
    int8, a batch of 32 texts up to 128 tokens and 28 images: +83 instead of +103 MiB, same speed)."""
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
        # meanwhile (serve end to end at batch 64, int8, 2 cores: 53 and 57 posts/s against 49 and 51 spinning;
        # the bare forward within its noise, 51 against 53).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.precision = precision
        self.path = path
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: Mapping[str, Tensor]) -> Tensor:
        arrays = {name: feeds[name].detach().contiguous().numpy() for name in self.inputs}
        return torch.from_numpy(self.session.run(None, arrays)[0])


@dataclass(frozen=True)
class OnnxOnly:
    """An inference-only encoder: where its files may lie, and how to rebuild its torch network should none be
    there (an export in the serving process, the slow and memory-hungry exception)."""

    network: Callable[[], nn.Module]
    directories: Sequence[Path] = ()


class OnnxSwitch:
    """CPU inference through ONNX Runtime, as a switch on an encoder module (whose network is ``self.model``).

    ``runtime="onnxruntime"`` runs fp32 inference (eval mode, no autograd, CPU inputs) through an export of the
    current weights; ``precision="int8"`` runs it through the int8 model whatever the runtime says (int8 exists
    only in ONNX Runtime). Training, autograd and GPU inputs always take the torch path (the CUDA path keeps its
    autocast), so the switch never changes what is trained. New weights (a checkpoint) mean a new export.
    With ``onnx_only`` the encoder has no network: loading weights finds their file, and every call runs it.
    """

    runtime: str
    precision: str
    onnx_only: OnnxOnly | None
    onnx_kind: str
    model: nn.Module | None
    _session: OnnxSession | None

    def _init_switch(self, runtime: str, precision: str, onnx_only: OnnxOnly | None = None) -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if onnx_only is not None and not served_by_onnx(runtime, precision):
            raise ValueError("an inference-only encoder needs runtime 'onnxruntime' or precision 'int8'")
        self.runtime, self.precision, self.onnx_only = runtime, precision, onnx_only
        self._session = None
        self._session_lock = threading.Lock()

    def _takes_onnx(self, tensor: Tensor) -> bool:
        if self.onnx_only is not None:
            if tensor.device.type != "cpu":
                raise ValueError("an inference-only (ONNX Runtime) encoder runs on CPU inputs only")
            return True
        return (
            served_by_onnx(self.runtime, self.precision)
            and not self.training  # type: ignore[attr-defined]
            and not torch.is_grad_enabled()
            and tensor.device.type == "cpu"
        )

    def onnx_export(self) -> OnnxExport:
        raise NotImplementedError

    def onnx_calibration_id(self) -> str:
        """What besides the weights goes into the int8 file (the image model's calibration set)."""
        return ""

    def onnx_session(self) -> OnnxSession:
        """The ONNX Runtime session of the current weights and precision (from the cache, else exported now)."""
        with self._session_lock:
            if self.onnx_only is not None:
                if self._session is None:
                    raise RuntimeError(
                        "an inference-only encoder gets its session by loading weights (a checkpoint)"
                    )
            elif self._session is None or self._session.precision != self.precision:
                self._session = OnnxSession(
                    onnx_model_file(self.onnx_export(), self.precision), self.precision
                )
            return self._session

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Tensor],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        self._session = None  # new weights: another file
        if self.onnx_only is None:
            super()._load_from_state_dict(  # type: ignore[misc]
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            return
        weights = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
        if not weights:
            error_msgs.append(f"no weights for the inference-only {self.onnx_kind} encoder under {prefix!r}")
            return
        self._session = OnnxSession(self._onnx_file(weights), self.precision)

    def _onnx_file(self, weights: Mapping[str, Tensor]) -> Path:
        """The file of ``weights``: beside the checkpoint or in the cache; else exported here, with a warning."""
        assert self.onnx_only is not None
        name = onnx_file_name(self.onnx_kind, self.precision, self.onnx_calibration_id(), weights)
        for directory in (*self.onnx_only.directories, onnx_cache_dir()):
            if (directory / name).is_file():
                return directory / name
        log.warning(
            "no exported %s encoder (%s) for these weights: exporting in this process, which costs it time and "
            "memory; run `python -m core.encoders CHECKPOINT --precision %s` where the checkpoint is built",
            self.onnx_kind,
            name,
            self.precision,
        )
        network = self.onnx_only.network()
        network.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()})
        self.model = network.eval()
        try:
            return onnx_model_file(self.onnx_export(), self.precision)
        finally:
            self.model = None

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        if self.onnx_only is not None and self.model is None:
            raise RuntimeError(
                "an inference-only encoder holds no torch weights to save; load the checkpoint anew"
            )
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles carry the weights, not the session or its lock (rebuilt on demand)."""
        return {**self.__dict__, "_session": None, "_session_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self._session_lock = threading.Lock()


def configure_cpu_inference(
    encoder: nn.Module, runtime: str | None = None, precision: str | None = None
) -> None:
    """Switch an encoder's CPU inference runtime and/or precision (serving a checkpoint without retraining).

    Names are checked in one place, ``OnnxSwitch._init_switch``; ONNX Runtime's presence here, when it is asked
    for. An inference-only encoder runs the file it was loaded with: it accepts only its own settings.
    """
    if not isinstance(encoder, OnnxSwitch):
        raise ValueError(f"the {type(encoder).__name__} encoder has no switchable runtime")
    runtime, precision = runtime or encoder.runtime, precision or encoder.precision
    if encoder.onnx_only is not None:
        if (runtime, precision) != (encoder.runtime, encoder.precision):
            raise ValueError(
                "an inference-only encoder cannot switch runtime or precision; load the checkpoint anew"
            )
        return
    if served_by_onnx(runtime, precision):
        require_onnxruntime(f"runtime {runtime!r} at precision {precision!r}")
    encoder._init_switch(runtime, precision)


def prepare_onnx(checkpoint: str | Path, precision: str, out: Path | None = None) -> list[Path]:
    """Export (and quantise) a checkpoint's encoders into ``out`` (default: beside it), so serving starts warm.

    Run it where the checkpoint is built or the pod's volume is filled (``python -m core.encoders CHECKPOINT
    --precision int8``): the exporter, the quantiser's calibration (~1.6 GiB peak) and the torch encoders stay out
    of the serving process, which finds the files beside the checkpoint.
    """
    from core.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint).model.eval()
    files = []
    for encoder in (model.image_encoder, model.text_encoder):
        configure_cpu_inference(encoder, precision=precision)
        assert isinstance(encoder, OnnxSwitch)  # configure_cpu_inference refuses any other
        files.append(onnx_model_file(encoder.onnx_export(), precision, out or onnx_dir_for(checkpoint)))
    return files


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m core.encoders CHECKPOINT [--precision int8] [--out DIR]``: print the files it wrote or found."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m core.encoders", description="Export a checkpoint's encoders for ONNX Runtime serving."
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: CHECKPOINT.onnx/ beside the checkpoint"
    )
    args = parser.parse_args(argv)
    for path in prepare_onnx(args.checkpoint, args.precision, args.out):
        print(path)
