"""How far a compiled quantized model may be from ONNX Runtime: ONNX Runtime's own rounding.

A QDQ model's outputs are not defined to float precision: an integer kernel (ONNX Runtime's,
effc's) and the graph read as written (DequantizeLinear then float ops) round the requantised
values differently wherever a value falls near a step, and a flipped step moves everything after
it. ONNX Runtime with its optimisations fuses QDQ into integer kernels (and int4 DQ -> MatMul into
MatMulNBits, which quantizes the activations to int8); with them off it runs the graph as written.
The distance between those two runs is ONNX Runtime's own int8 rounding on these inputs; a compiled
module is held to twice that (and never less than the float tolerance).
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
    import onnxruntime as ort

    from effc.ir import to_proto
    from effc.verify import OrtRunner, deviation

    fused = OrtRunner(model).run_all(feeds)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name for i in session.get_inputs()}
    plain = [dict(zip(names, session.run(names, {k: v for k, v in f.items() if k in inputs}))) for f in feeds]
    return deviation(fused, plain).max_rel


def tolerance_for(model, feeds: list[dict], base: float) -> float:
    return max(base, 2 * ort_rounding(model, feeds))
