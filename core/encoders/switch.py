"""``OnnxSwitch``: CPU inference of an encoder module through its exported ONNX file, as a switch on the module.

Two ways to use it:

* on a torch encoder: CPU inference goes through the file of the current weights, exported on first use; training,
  autograd and GPU inputs keep the torch path.
* inference only (``OnnxOnly``): the encoder has no torch network at all; loading a checkpoint only hashes its
  weights to find the file. This is how ``serve`` runs on CPU: a torch copy of both encoders, the tracer and the
  quantiser would cost a serving process memory it never uses (BENCHMARKS.md, memory).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.encoders.export import OnnxExport, onnx_cache_dir, onnx_file_name, onnx_model_file
from core.encoders.sessions import PRECISIONS, RUNTIMES, OnnxSession, require_onnxruntime, served_by_onnx

log = logging.getLogger(__name__)


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
