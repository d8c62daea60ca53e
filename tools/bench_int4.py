"""int4 weight-only side by side: effc vs ONNX Runtime's MatMulNBits on the same model.

    python tools/bench_int4.py [--seq 1] [--block 32] [--work DIR] [--rounds 15] [--threads 2]
                               [--matmul M,K,N]   (one linear layer instead of gpt2)

gpt2 (the zoo's module) is exported at ``--seq`` tokens, its MatMul weights quantized by ONNX
Runtime's MatMulNBitsQuantizer in QDQ form (blocked DequantizeLinear int4 -> MatMul, RTN, asymmetric,
block ``--block``). ORT runs that file with ``session.qdq_matmulnbits_accuracy_level=4`` (it fuses
each DQ -> MatMul into MatMulNBits, int8 activations on VNNI); effc compiles the same file.
Medians of interleaved runs (effc.codegen.bench.turns) and the agreement of effc with ORT
(max abs diff relative to the largest |logit|, cosine).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def export_gpt2(seq: int, path: Path) -> Path:
    if path.exists():
        return path
    from effc.frontend.torch import from_torch
    from effc.ir import save
    from effc.zoo import _hf, gpt2

    module = gpt2._make_module()
    ids = np.random.default_rng(0).integers(0, gpt2.VOCAB_SIZE, size=(1, seq), dtype=np.int64)
    model = from_torch(module, _hf.to_tensors({"input_ids": ids}, ("input_ids",)), opset=_hf.OPSET,
                       input_names=["input_ids"], output_names=["logits"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model, path)
    return path


def export_matmul(m: int, k: int, n: int, path: Path) -> Path:
    """One linear layer x[1, m, k] @ W[k, n] (random weights), as a float ONNX file."""
    if path.exists():
        return path
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(0).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["input_ids", "W"], ["logits"])], "linear",
                              [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, [1, m, k])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, m, n])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def gemms_as_matmuls(model):
    """Gemm(x, W const) (+ C) -> MatMul(x, W) (+ Add C) and MatMul(x, Transpose(W const)) ->
    MatMul(x, W^T), in place: ORT's weight quantizer takes only MatMuls with an initializer weight
    (the seq-1 export makes every linear a Gemm, and the tied LM head reads Transpose(wte))."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and node.input[1] in inits and not attrs.get("transA", 0) \
                and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0:
            w = node.input[1]
            if attrs.get("transB", 0):
                t = numpy_helper.from_array(numpy_helper.to_array(inits[w]).T.copy(), w + "_t")
                graph.initializer.append(t)
                w = t.name
            out = node.output[0]
            has_bias = len(node.input) > 2 and node.input[2]
            mm_out = out + "_mm" if has_bias else out
            nodes.append(helper.make_node("MatMul", [node.input[0], w], [mm_out], name=node.name + "_matmul"))
            if has_bias:
                nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [out], name=node.name + "_bias"))
            continue
        if node.op_type == "MatMul" and node.input[1] in producers:
            tr = producers[node.input[1]]
            if tr.op_type == "Transpose" and tr.input[0] in inits:
                w = numpy_helper.to_array(inits[tr.input[0]])
                perm = [a.ints for a in tr.attribute if a.name == "perm"]
                t = numpy_helper.from_array(np.transpose(w, list(perm[0]) if perm else None).copy(),
                                            tr.output[0] + "_w")
                graph.initializer.append(t)
                node.input[1] = t.name
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def quantize_w4(src: Path, dst: Path, block: int) -> Path:
    if dst.exists():
        return dst
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, accuracy_level=4,
                                          quant_format=QuantFormat.QDQ, op_types_to_quantize=("MatMul",))
    quant = MatMulNBitsQuantizer(gemms_as_matmuls(onnx.load(str(src))), algo_config=config)
    quant.process()
    dst.parent.mkdir(parents=True, exist_ok=True)
    quant.model.save_model_to_file(str(dst), use_external_data_format=True)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--work", default="/tmp/effc-int4-bench")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--matmul", default="", help="M,K,N: one linear layer instead of gpt2")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import onnxruntime as ort

    from effc.codegen.bench import turns
    from effc.codegen.build import compile_model
    from effc.codegen.runtime import load_compiled
    from effc.frontend.onnx import load

    work = Path(args.work)
    if args.matmul:
        m, k, n = (int(v) for v in args.matmul.split(","))
        name = f"linear-{m}x{k}x{n}"
        src = export_matmul(m, k, n, work / name / "model.onnx")
    else:
        name = f"gpt2-s{args.seq}"
        src = export_gpt2(args.seq, work / name / "model.onnx")
    w4 = quantize_w4(src, work / f"{name}-w4b{args.block}" / "model.onnx", args.block)
    out = work / f"{name}-w4b{args.block}-effc"
    if not (out / "model.so").exists():
        start = time.perf_counter()
        res = compile_model(load(str(w4)), "llvm", out)
        print(f"compiled in {time.perf_counter() - start:.0f} s; {res.custom_summary}; rules {res.rule_hits}",
              flush=True)
    compiled = load_compiled(out, threads=args.threads)
    if args.matmul:
        feed = {"input_ids": np.random.default_rng(7).standard_normal((1, m, k)).astype(np.float32)}
    else:
        feed = {"input_ids": np.random.default_rng(7).integers(0, 50257, size=(1, args.seq), dtype=np.int64)}
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4")
    sess = ort.InferenceSession(str(w4), so, providers=["CPUExecutionProvider"])
    ref = sess.run(None, feed)[0]
    got = compiled(feed)[compiled.output_names[0]]
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    cos = float(np.dot(got.ravel(), ref.ravel()) / (np.linalg.norm(got) * np.linalg.norm(ref)))
    steady, _ = turns({"effc": lambda: compiled(feed), "ort_matmulnbits_acc4": lambda: sess.run(None, feed)},
                      args.rounds, warmup=2)
    row = {"model": f"{name} w4 (block {args.block})",
           "median_ms": {k: float(np.median(v) * 1e3) for k, v in steady.items()},
           "min_ms": {k: float(np.min(v) * 1e3) for k, v in steady.items()},
           "max_rel_diff_vs_ort": rel, "cosine_vs_ort": cos}
    print(json.dumps(row), flush=True)
    (work / f"results-{name}-b{args.block}.json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
