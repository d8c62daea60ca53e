"""ONNX models of one standard Attention node (opset 23/24), built with onnx.helper, and their feeds."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto, helper

OUTPUTS = ("Y", "present_key", "present_value", "qk_matmul_output")


@dataclass
class Case:
    """Shapes of Q, K, V (3-D [B, S, H*D] or 4-D [B, H, S, D]) and what else the node takes."""
    q: tuple
    k: tuple
    v: tuple
    attrs: dict = field(default_factory=dict)
    mask: tuple | None = None  # attn_mask shape
    mask_dtype: str = "bool"  # "bool" (True = attend) or "float" (added)
    past: tuple | None = None  # (past_key shape, past_value shape)
    nonpad: bool = False  # nonpad_kv_seqlen input (opset 24)
    outputs: tuple = ("Y",)  # which of OUTPUTS the node writes
    opset: int = 23


def attention_proto(case: Case):
    """A ModelProto with inputs q, k, v[, mask][, past_key, past_value][, nonpad] and one Attention."""
    float_in = [("q", case.q), ("k", case.k), ("v", case.v)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in float_in]
    names = ["q", "k", "v"]
    if case.mask is not None:
        dtype = TensorProto.BOOL if case.mask_dtype == "bool" else TensorProto.FLOAT
        inputs.append(helper.make_tensor_value_info("mask", dtype, case.mask))
        names.append("mask")
    if case.past is not None:
        names += ["" for _ in range(4 - len(names))] + ["past_key", "past_value"]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                   for n, s in zip(("past_key", "past_value"), case.past)]
    if case.nonpad:
        names += ["" for _ in range(6 - len(names))] + ["nonpad"]
        inputs.append(helper.make_tensor_value_info("nonpad", TensorProto.INT64, [case.q[0]]))
    last = max(OUTPUTS.index(o) for o in case.outputs)
    out_names = [o if o in case.outputs else "" for o in OUTPUTS[:last + 1]]
    node = helper.make_node("Attention", names, out_names, name="attn", **case.attrs)
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, output_shapes(case)[o]) for o in case.outputs]
    graph = helper.make_graph([node], "attention", inputs, outputs)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    proto.ir_version = 10
    return proto


def output_shapes(case: Case) -> dict[str, list[int]]:
    if len(case.q) == 4:
        (b, hq, sq, d), (_, hkv, skv, _), dv = case.q, case.k, case.v[3]
    else:
        hq, hkv = case.attrs["q_num_heads"], case.attrs["kv_num_heads"]
        b, sq, d, skv, dv = case.q[0], case.q[1], case.q[2] // hq, case.k[1], case.v[2] // hkv
    total = skv + (case.past[0][2] if case.past else 0)
    y = [b, hq, sq, dv] if len(case.q) == 4 else [b, sq, hq * dv]
    return {"Y": y, "present_key": [b, hkv, total, d], "present_value": [b, hkv, total, dv],
            "qk_matmul_output": [b, hq, sq, total]}


def attention_feeds(case: Case, count: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Normal Q/K/V/past; bool masks with about a quarter of keys masked (never a whole row);
    float masks with values in [-2, 0] and about a quarter at -inf; nonpad lengths in [1, S_kv]."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {n: rng.standard_normal(s).astype(np.float32) for n, s in (("q", case.q), ("k", case.k), ("v", case.v))}
        if case.past is not None:
            feed["past_key"], feed["past_value"] = (rng.standard_normal(s).astype(np.float32) for s in case.past)
        if case.mask is not None:
            keep = rng.random(case.mask) > 0.25
            keep[..., 0] = True  # a row with no key attended is its own test
            if case.mask_dtype == "bool":
                feed["mask"] = keep
            else:
                feed["mask"] = np.where(keep, -2 * rng.random(case.mask), -np.inf).astype(np.float32)
        if case.nonpad:
            kv_len = (case.k[1] if len(case.k) == 3 else case.k[2]) + (case.past[0][2] if case.past else 0)
            feed["nonpad"] = rng.integers(1, kv_len + 1, size=[case.q[0]]).astype(np.int64)
        feeds.append(feed)
    return feeds
