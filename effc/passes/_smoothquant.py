"""SmoothQuant: move activation outliers into the weights, exactly, before quantizing W8A8.

For an activation x read only by linears (Q, K and V read one LayerNorm's output), each input
channel j gets s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha) (over every linear reading x):
x becomes x / s and each W's column j becomes W_j * s_j, which leaves x @ W^T unchanged. The
division is folded into whatever writes x: a LayerNormalization / RMSNormalization's scale
(and bias), a Mul by a constant per-channel vector (and the Add of a constant after it), or a
preceding linear's output channels (weight and bias). Each fold is checked in ONNX Runtime
against the unsmoothed model before anything is quantized; a site that cannot be folded, or
whose fold is not exact, is left unsmoothed with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from effc.ir import const_value, consumers, replace_input
from effc.passes._linears import Linear

NORMS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
EXACT = 1e-4  # the largest relative output change a fold may cause (float rounding only)


@dataclass
class Site:
    x: ir.Value
    readers: list[Linear]
    writer: str = ""                     # what absorbs 1 / s, in words
    shared: bool = False                 # x is read by other nodes too: the norm is copied for the linears
    undo: list[tuple[ir.Node, int, ir.Value]] = field(default_factory=list)
    added: list[ir.Node] = field(default_factory=list)


def find_sites(linears: list[Linear]) -> tuple[list[Site], list[tuple[str, str]]]:
    """Activations read only by the given linears, grouped: (sites, [(x name, why not)])."""
    by_x: dict[str, list[Linear]] = {}
    values: dict[str, ir.Value] = {}
    for lin in linears:
        by_x.setdefault(lin.x.name, []).append(lin)
        values[lin.x.name] = lin.x
    sites, refused = [], []
    for name, readers in by_x.items():
        x = values[name]
        mine = {id(lin.node) for lin in readers}
        others = [n for n in consumers(x) if id(n) not in mine]
        writer = x.producer()
        if writer is None:
            refused.append((name, "a graph input: nothing to fold 1 / s into"))
        elif (others or x.is_graph_output()) and writer.op_type not in NORMS:
            reader = f"{others[0].op_type} '{others[0].name}'" if others else "the graph output"
            refused.append((name, f"also read by {reader}, which would see x / s"))
        else:
            sites.append(Site(x, readers, shared=bool(others) or x.is_graph_output()))
    return sites, refused


def smoothing_scales(site: Site, channel_absmax: np.ndarray, alpha: float) -> np.ndarray:
    w_max = np.max([np.abs(lin.weight).max(axis=0) for lin in site.readers], axis=0)
    a = np.maximum(channel_absmax.astype(np.float64), 1e-5)
    w = np.maximum(w_max.astype(np.float64), 1e-5)
    s = a ** alpha / w ** (1.0 - alpha)
    s = np.where((channel_absmax > 0) & (w_max > 0), s, 1.0)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def repq_scales(site: Site, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RepQ-ViT: (r1, t) that turn x's per-channel uint8 ranges into one per-tensor range:
    x' = (x + t) / r1 has channel c's quantization step s_c / r1_c = mean step and its zero point
    shifted by t_c / step_c to the mean zero point."""
    lo, hi = np.minimum(lo, 0.0).astype(np.float64), np.maximum(hi, 0.0).astype(np.float64)
    step = np.maximum((hi - lo) / 255.0, 1e-8)
    zero = np.round(-lo / step)
    mean_step, mean_zero = float(step.mean()), float(np.round(zero.mean()))
    return (step / mean_step).astype(np.float32), (step * (zero - mean_zero)).astype(np.float32)


def fold(site: Site, s: np.ndarray, linears_by_output: dict[str, Linear],
         shift: np.ndarray | None = None) -> str | None:
    """Fold ``s`` (and ``shift`` t) into the site: the writer makes (x + t) / s instead of x, each
    reader's weight columns are multiplied by s (and its bias loses W t). The reason if it cannot."""
    writer = site.x.producer()
    if shift is not None:
        if writer.op_type not in NORMS:
            return f"written by {writer.op_type} '{writer.name}': a shift folds only into a norm's bias"
        if len(writer.inputs) < 3 or writer.inputs[2] is None:
            return f"{writer.op_type} '{writer.name}' has no bias to absorb the shift"
        unbiased = [lin.name for lin in site.readers if lin.bias is None]
        if unbiased:
            return f"linear '{unbiased[0]}' has no bias to absorb the shift"
    reason = _fold_writer(site, writer, s, linears_by_output, shift)
    if reason:
        _undo(site)
        return reason
    for lin in site.readers:
        _scale_reader(site, lin, s)
        if shift is not None:
            _shift_bias(site, lin, shift)
    return None


def _shift_bias(site: Site, lin: Linear, t: np.ndarray) -> None:
    bias = lin.bias - lin.weight.astype(np.float64) @ t.astype(np.float64)  # [N]
    if lin.bias_add is not None:
        i = 1 if lin.bias_add.inputs[0] is lin.node.outputs[0] else 0
        shape = const_value(lin.bias_add.inputs[i]).shape
        _replace(site, lin.bias_add, i, bias.reshape(shape), f"{lin.name}.bias_shifted")
    else:  # Gemm: C, scaled by beta
        c = const_value(lin.node.inputs[2])
        beta = lin.node.attributes.get_float("beta", 1.0)
        _replace(site, lin.node, 2, np.broadcast_to(bias / beta, (len(bias),)).reshape(
            c.shape if c.size == len(bias) else (len(bias),)), f"{lin.name}.bias_shifted")


def _replace(site: Site, node: ir.Node, index: int, array: np.ndarray, hint: str) -> None:
    site.undo.append((node, index, node.inputs[index]))
    replace_input(node, index, array.astype(np.float32), hint)


def _undo(site: Site) -> None:
    for node, index, old in reversed(site.undo):
        node.replace_input_with(index, old)
    site.undo.clear()
    for node in site.added:
        node.graph.remove(node, safe=True)
    site.added.clear()


def undo(site: Site) -> None:
    _undo(site)


def _per_channel(value: ir.Value | None, k: int) -> np.ndarray | None:
    c = const_value(value)
    if c is None or c.dtype != np.float32 or c.size not in (1, k) or (c.ndim and c.shape[-1] not in (1, k)):
        return None
    return np.broadcast_to(c.reshape(-1), (k,)).astype(np.float32)


def _fold_writer(site: Site, writer: ir.Node, s: np.ndarray, linears_by_output: dict[str, Linear],
                 shift: np.ndarray | None = None) -> str | None:
    k = len(s)
    if writer.op_type in NORMS:
        if site.shared:  # post-LN: the residual reads the norm too, so the linears get their own copy
            writer = _copy_norm(site, writer)
        axis = writer.attributes.get_int("axis", -1)
        rank = len(site.x.shape) if site.x.shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1):
            return f"{writer.op_type} normalises over axis {axis}, not the channel axis alone"
        gamma = _per_channel(writer.inputs[1], k)
        if gamma is None:
            return f"{writer.op_type}'s scale is not a constant [{k}] vector"
        _replace(site, writer, 1, gamma / s, f"{writer.name}.scale_smoothed")
        if len(writer.inputs) > 2 and writer.inputs[2] is not None:
            beta = _per_channel(writer.inputs[2], k)
            if beta is None:
                return f"{writer.op_type}'s bias is not a constant [{k}] vector"
            _replace(site, writer, 2, (beta if shift is None else beta + shift) / s, f"{writer.name}.bias_smoothed")
        site.writer = f"{writer.op_type} '{writer.name}'" + (" (a copy for the linears)" if site.shared else "")
        return None
    if site.x.name in linears_by_output:
        prev = linears_by_output[site.x.name]
        if prev.node.op_type != "MatMul":
            return f"preceding {prev.node.op_type} '{prev.name}': only a MatMul's output channels are rescaled"
        w = const_value(prev.node.inputs[1])  # [K_prev, K]
        _replace(site, prev.node, 1, w / s[None, :], f"{prev.name}.weight_smoothed")
        if prev.bias_add is not None:
            i = 1 if prev.bias_add.inputs[0] is prev.node.outputs[0] else 0
            _replace(site, prev.bias_add, i, prev.bias / s, f"{prev.name}.bias_smoothed")
        site.writer = f"linear '{prev.name}'"
        return None
    if writer.op_type == "Add":  # x = n * gamma + beta, the affine of a decomposed norm
        for i in (0, 1):
            beta = _per_channel(writer.inputs[1 - i], k)
            mul = writer.inputs[i].producer()
            if beta is None or mul is None or mul.op_type != "Mul" or len(consumers(writer.inputs[i])) != 1:
                continue
            for j in (0, 1):
                gamma = _per_channel(mul.inputs[1 - j], k)
                if gamma is not None and const_value(mul.inputs[j]) is None:
                    _replace(site, writer, 1 - i, beta / s, f"{writer.name}.bias_smoothed")
                    _replace(site, mul, 1 - j, gamma / s, f"{mul.name}.scale_smoothed")
                    site.writer = f"affine '{mul.name}' + '{writer.name}'"
                    return None
    if writer.op_type == "Mul":
        for j in (0, 1):
            gamma = _per_channel(writer.inputs[1 - j], k)
            if gamma is not None and const_value(writer.inputs[j]) is None:
                _replace(site, writer, 1 - j, gamma / s, f"{writer.name}.scale_smoothed")
                site.writer = f"scale '{writer.name}'"
                return None
    return f"written by {writer.op_type} '{writer.name}', which cannot absorb a per-channel 1 / s"


def _copy_norm(site: Site, norm: ir.Node) -> ir.Node:
    """A copy of ``norm`` (same input and attributes) whose output only the site's linears read."""
    copy = ir.Node(norm.domain, norm.op_type, list(norm.inputs), attributes=list(norm.attributes.values()),
                   name=f"{norm.name}.smoothed", num_outputs=1, version=norm.version)
    out = copy.outputs[0]
    out.name, out.shape, out.type = f"{site.x.name}_smoothed", site.x.shape, site.x.type
    norm.graph.insert_after(norm, copy)
    site.added.append(copy)
    for lin in site.readers:
        site.undo.append((lin.node, 0, lin.node.inputs[0]))
        lin.node.replace_input_with(0, out)
    return copy


def _scale_reader(site: Site, lin: Linear, s: np.ndarray) -> None:
    node = lin.node
    w = const_value(node.inputs[1])
    if node.op_type == "MatMul" or not node.attributes.get_int("transB", 0):
        scaled = w * s[:, None]  # [K, N]
    else:
        scaled = w * s[None, :]  # Gemm transB: [N, K]
    _replace(site, node, 1, scaled, f"{lin.name}.weight_smoothed")
