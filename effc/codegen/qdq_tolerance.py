"""How far a compiled quantized model may be from ONNX Runtime: ONNX Runtime's own rounding.

A QDQ model's outputs are not defined to float precision: an integer kernel (ONNX Runtime's,
effc's) and the graph read as written (DequantizeLinear then float ops) round the requantised
values differently wherever a value falls near a step, and a flipped step moves everything after
it. ONNX Runtime with its optimisations fuses QDQ into integer kernels (and int4 DQ -> MatMul into
MatMulNBits, which quantizes the activations to int8); with them off it runs the graph as written.
The distance between those two runs is ONNX Runtime's own int8 rounding on these inputs; a compiled
module is held to twice that (and never less than the float tolerance).

Those two runs may agree on the given inputs by chance (no value of theirs falls within float
rounding of a step), while a compiled module, whose float ops (a layer norm, GELU's erf, the
requantising scale) round in another order, flips a step that ONNX Runtime does not: one step of one
activation, a legitimate result, can move a row of the output by far more than 1e-4. So the
rounding measured is also the graph's sensitivity to exactly that (flip_sensitivity): ONNX Runtime
on the graph as written with each QuantizeLinear's scale moved by float-rounding amounts.
"""

from __future__ import annotations

QUANTIZE_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def is_quantized(model) -> bool:
    return any(node.op_type in QUANTIZE_OPS and node.domain in ("", "ai.onnx") for node in model.graph)


def ort_rounding(model, feeds: list[dict]) -> float:
    """max_rel (effc.verify.deviation) of ONNX Runtime optimised against ONNX Runtime running the
    graph as written, over ``feeds``; 0.0 for a model without QDQ."""
    if not is_quantized(model):
        return 0.0
    from effc.ir import in_memory_proto
    from effc.verify import OrtRunner, deviation

    return deviation(OrtRunner(model).run_all(feeds), _as_written(in_memory_proto(model), feeds)).max_rel


FLIP_EPS = 1e-6  # relative: how far a float value computed in another order lands (fast erf/exp, sums)
FLIP_TRIALS = 3


def flip_eps(precision: str) -> float:
    """How far a float value a module of ``precision`` computes may land from ONNX Runtime's."""
    from effc.codegen.precision import BF16_ROUNDING

    return BF16_ROUNDING if precision == "bf16" else FLIP_EPS


def flip_sensitivity(model, feeds: list[dict], trials: int = FLIP_TRIALS, eps: float = FLIP_EPS) -> float:
    """The largest max_rel over ``trials`` runs of ONNX Runtime on the graph as written with every
    QuantizeLinear's constant scale moved by ``eps`` relative (all up, all down, then seeded random
    directions), against the unmoved graph: what values landing on the other side of a rounding step
    do to the outputs. 0.0 without QuantizeLinear."""
    import numpy as np
    from onnx import numpy_helper

    from effc.ir import in_memory_proto
    from effc.verify import deviation

    proto = in_memory_proto(model)
    scales = {n.input[1] for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx")}
    moved = [t for t in proto.graph.initializer if t.name in scales]
    if not moved:
        return 0.0
    originals = {t.name: numpy_helper.to_array(t) for t in moved}
    reference = _as_written(proto, feeds)
    rng = np.random.default_rng(0)
    worst = 0.0
    for trial in range(trials):
        for t in moved:
            value = originals[t.name]
            sign = (1.0, -1.0)[trial] if trial < 2 else rng.choice((-1.0, 1.0), size=value.shape)
            t.CopyFrom(numpy_helper.from_array((value * (1 + eps * sign)).astype(value.dtype), t.name))
        worst = max(worst, deviation(_as_written(proto, feeds), reference).max_rel)
    return worst


def _as_written(proto, feeds: list[dict]) -> list[dict]:
    """ONNX Runtime with its optimisations off on ``proto`` (a ModelProto)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name for i in session.get_inputs()}
    return [dict(zip(names, session.run(names, {k: v for k, v in f.items() if k in inputs}))) for f in feeds]


def own_rounding(model, feeds: list[dict], eps: float = FLIP_EPS) -> float:
    """How far a QDQ model's outputs are defined on ``feeds``: ONNX Runtime's own rounding and the
    graph's flip sensitivity to values moved by ``eps`` relative (FLIP_EPS: fp32 computed in another
    order; a bf16 build: bf16's rounding), whichever is larger."""
    if not is_quantized(model):
        return 0.0
    return max(ort_rounding(model, feeds), flip_sensitivity(model, feeds, eps=eps))


def tolerance_for(model, feeds: list[dict], base: float, eps: float = FLIP_EPS) -> float:
    return max(base, 2 * own_rounding(model, feeds, eps))
