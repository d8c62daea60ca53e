"""OpenVINO as an `effc bench` engine (optional: the `bench` extra), on the ONNX model ONNX Runtime runs.

OpenVINO picks its inference precision per CPU: on one with bf16 (AVX-512 BF16 or AMX) it computes
matmuls in bf16 by default, which a user running it gets, so `--vs openvino` times two engines:
"openvino-f32" (INFERENCE_PRECISION_HINT=f32, the like-for-like comparison) and "openvino" (its
default), each reporting the precision it ran. Inputs are fixed to the bench feed's shapes before
compiling (as effc's build is static); threads as the other engines (INFERENCE_NUM_THREADS), one
stream, latency hint, threads not pinned to cores (ENABLE_CPU_PINNING off: see OpenVinoEngine).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from effc.errors import EffcError

F32 = "openvino-f32"
DEFAULT = "openvino"
VARIANTS = {F32: "f32", DEFAULT: None}  # engine name -> INFERENCE_PRECISION_HINT (None: OpenVINO's choice)


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise EffcError("--vs openvino needs OpenVINO, which is not installed (pip install 'effc[bench]')") from None
    return openvino


class OpenVinoEngine:
    """A zero-argument OpenVINO CPU inference of ``model_path`` on ``feed``, ``threads`` threads, at
    ``precision`` ("f32", "bf16", ...; None: the precision OpenVINO picks for this CPU)."""

    def __init__(self, model_path: str | Path, feed: dict[str, np.ndarray], threads: int,
                 precision: str | None = None):
        ov = import_openvino()
        core = ov.Core()
        try:
            model = core.read_model(str(model_path))
            names = [port.get_any_name() for port in model.inputs]
            missing = [n for n in names if n not in feed]
            if missing:
                raise EffcError(f"OpenVINO: the bench inputs lack {', '.join(missing)}")
            model.reshape({n: list(feed[n].shape) for n in names})
            # Unpinned, like the other engines' threads: OpenVINO's default pinning slowed the engine
            # timed after it (effc on vit-s16, 2 threads: 158 ms of CPU per call instead of 94) and,
            # on this shared VM, OpenVINO itself (116 ms of CPU per call pinned, 95 unpinned).
            config = {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                      "ENABLE_CPU_PINNING": False}
            if precision:
                config["INFERENCE_PRECISION_HINT"] = precision
            self.compiled = core.compile_model(model, "CPU", config)
        except EffcError:
            raise
        except Exception as exc:  # OpenVINO's own refusal of the model: one line
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
            raise EffcError(f"OpenVINO cannot compile {model_path} ({lines[0][:200] if lines else type(exc).__name__})") \
                from None
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.request = self.compiled.create_infer_request()
        self.inputs = {n: np.ascontiguousarray(feed[n]) for n in names}
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]

    def __call__(self):
        return self.request.infer(self.inputs)

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name on ``feed`` (same shapes as the bench feed), for the agreement check."""
        result = self.request.infer({n: np.ascontiguousarray(feed[n]) for n in self.inputs})
        return {port.get_any_name(): np.array(value) for port, value in result.items()}
