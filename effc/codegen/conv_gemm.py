"""Convolutions as matrix products: im2col plus a GEMM the matmul rule schedules (a Relax rewrite).

An NCHW conv (1-D or 2-D, any stride, padding, dilation, groups) computes, per image and group,
``out[o, p] = sum_k W[o, k] * col[k, p]``, where ``col`` gathers for every output pixel p the
(channel, kernel tap) inputs it reads: im2col. This rewrite emits that form with TE:

- ``col[n, (g,) k, p]``: the gather, zero where a tap falls on padding. A pointwise stride-1 conv
  needs none (the input is col); a stride-1 conv computes it inside the GEMM kernel, where the
  matmul rule packs col into panels per call anyway (one pass over col instead of three); a strided
  conv gets a kernel of its own (the im2col rule: inside the packing, its index arithmetic and
  strided loads made the stem conv 1.8x slower);
- ``out[n, (g,) o, p] = sum_k W2[(n,) (g,) o, k] * col[n, (g,) k, p]``: every access a bare loop
  variable, the matmul rule's S/I/J/K form with one loop per group (S = images and groups, I = o,
  J = pixels). W2 is the weight reshaped (and for several images broadcast: a loop fused from two
  in a group is what that rule gets wrong when it pads, so each image is a batch entry): weight-only,
  so prefold evaluates it at compile time. Where the pixels are no whole number of the rule's
  j tiles (7 x 7 = 49 padded to 64 did 1.3x the work) and o is, the product's operands swap
  (ConvShape.pixel_rows): pixels are the GEMM's rows, col read in place (its gather a kernel of
  its own), W2 the packed operand, and the tile's write-back transposes. The result is reshaped to NCHW; sink_reshape moves the
  bias, activation and residual add above that reshape, into the GEMM's tile write-back.

The matmul rule reads W2 in place (one broadcast per row and k step) and packs col into j-panels per
call (k * pixels, against the GEMM's o * k * pixels).

The flat gather (ConvShape.shifted: 2-D, stride 1, pixels as columns, junk within MAX_JUNK): the input
is zero-padded once (``conv_pad``, rows of flat_width = the padded width), and tap t of output pixel
q = y * flat_width + x reads padded[q + offset(t)]: every col row is a contiguous slice, so the
matmul rule reads it in place (IN_PLACE) with no per-call packing of col. The GEMM computes
flat_width - W junk columns per output row (and a tail to whole j tiles), which a crop drops (the
crop fuses with the epilogue, and with the next conv's padding). 56 x 56 x 64 (4% junk): 2.44 ->
2.18 ms, about ORT's 2.1; at 28 x 28 (10% junk) it was no faster, so it is not taken there.

A depthwise conv (one input channel per
group) is no GEMM (k = the taps alone): it stays a conv, for the window rule; so does a conv with a
few input channels (ConvShape.direct: an image's or a waveform's stem).
"""

from __future__ import annotations

import math

from effc.codegen.relax_rewrite import mutator_pass

CONV_OPS = ("relax.nn.conv1d", "relax.nn.conv2d")
GEMM_PREFIX = "conv_gemm"  # the GEMM kernels' name (sink_reshape looks for it)
IN_PLACE = "effc.col_in_place"  # the flat gather: the matmul rule reads it in place, unpacked
IM2COL = "effc.im2col"  # the gather block's annotation: [channels per group, *kernel, *out] (its rule reads it)
DIRECT_MAX_CHANNELS = 4  # convs with at most this many input channels ...
DIRECT_MAX_TAPS = 256  # ... and taps per output (3 x 7 x 7 = 147) are left to the window rule
PIXEL_TILE = 32  # the fp32 matmul rule's j tile (2 AVX-512 vectors) ...
BF16_PIXEL_TILE = 16  # ... and the bf16 rule's granule (one vector: its edge panel computes whole vectors)
MAX_JUNK = 1 / 16  # junk columns (of the pixels) beyond which the flat gather is not taken
MAX_PIXEL_PAD = 1 / 8  # padded pixel columns (of the pixels) beyond which the pixels become the rows
BF16 = "bfloat16"
LAYOUTS = {"relax.nn.conv1d": ("NCW", "OIW", "NCW"), "relax.nn.conv2d": ("NCHW", "OIHW", "NCHW")}


def conv_gemm_pass(precision: str = "fp32"):
    """``precision`` bf16: the GEMMs take bf16 operands with fp32 accumulation (module doc)."""
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class ConvGemm(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            conv = conv_shape(call)
            if conv is None or conv.depthwise or conv.direct:
                return call
            emit, op = self.builder_.emit, relax.op
            lead = [conv.n] if conv.n > 1 else []
            lead += [conv.groups] if conv.groups > 1 else []
            w2 = emit(op.reshape(call.args[1], lead[len(lead) - (conv.groups > 1):] + [conv.o // conv.groups, conv.k]))
            if conv.n > 1:  # the images as the batch axis S of every operand (see the module doc)
                w2 = emit(op.broadcast_to(w2, lead + [conv.o // conv.groups, conv.k]))
            if precision == "bf16":
                conv.pixel_rows = conv.pads_pixels(BF16_PIXEL_TILE)
                return self.bf16_gemm(call, conv, w2)
            if conv.pointwise and conv.groups == 1:
                col = emit(op.reshape(call.args[0], [conv.n, conv.c, conv.pixels]))
                out = self.builder_.emit_te(lambda w, x: _gemm(w, x, conv), w2, col, primfunc_name_hint=GEMM_PREFIX)
            elif conv.shifted:  # col's rows: shifted slices of the padded input (module doc)
                xp = self.builder_.emit_te(lambda x: _pad_flat(x, conv), call.args[0], primfunc_name_hint="conv_pad")
                out = self.builder_.emit_te(lambda w, x: _gemm(w, _shifted(x, conv), conv, conv.flat_pixels), w2, xp,
                                            primfunc_name_hint=GEMM_PREFIX)
                return _crop_output(out, conv)
            elif all(s == 1 for s in conv.stride) and not conv.pixel_rows:  # the gather runs in the GEMM's packing of col
                out = self.builder_.emit_te(lambda w, x: _gemm(w, _im2col(x, conv), conv), w2, call.args[0],
                                            primfunc_name_hint=GEMM_PREFIX)
            else:
                col = self.builder_.emit_te(lambda x: _im2col(x, conv), call.args[0], primfunc_name_hint="im2col")
                out = self.builder_.emit_te(lambda w, x: _gemm(w, x, conv), w2, col, primfunc_name_hint=GEMM_PREFIX)
            return _to_output(out, conv)

        def bf16_gemm(self, call, conv, w2):
            """The GEMM on bf16 operands: W2 cast (weight-only: at compile time) and col written
            as bf16 by its gather (or, pointwise, cast from the input), once per call."""
            emit, op = self.builder_.emit, relax.op
            w2 = emit(op.astype(w2, BF16))
            if conv.pointwise and conv.groups == 1:
                col = emit(op.astype(emit(op.reshape(call.args[0], [conv.n, conv.c, conv.pixels])), BF16))
            else:
                col = self.builder_.emit_te(lambda x: _im2col(x, conv, BF16), call.args[0], primfunc_name_hint="im2col")
            out = self.builder_.emit_te(lambda w, x: _gemm(w, x, conv), w2, col, primfunc_name_hint=GEMM_PREFIX)
            return _to_output(out, conv)

    return mutator_pass(ConvGemm, "EffcConvGemm")


def _crop_output(out, conv):
    """The flat GEMM's [n, (g,) o, out rows * padded width] as NCHW: its junk columns cropped."""
    from tvm import relax

    op = relax.op
    rows = math.prod(conv.out[:-1]) * conv.flat_width
    if rows < conv.flat_pixels:  # the tail that rounds the columns up to whole tiles
        out = op.strided_slice(out, axes=[2 + (conv.groups > 1)], begin=[0], end=[rows])
    wide = op.reshape(out, [conv.n, conv.o, *conv.out[:-1], conv.flat_width])
    return op.strided_slice(wide, axes=[len(conv.out) + 1], begin=[0], end=[conv.out[-1]])


def _to_output(out, conv):
    from tvm import relax

    if conv.groups == 1 and len(conv.out) == 1:
        return out  # a conv1d's [n, o, pixels] already is its NCW output
    return relax.op.reshape(out, [conv.n, conv.o, *conv.out])


class ConvShape:
    """A static conv's geometry: n, c, o images/channels; kernel, out, stride, pad, dilation per
    spatial axis; k = taps per output channel (c / groups * prod(kernel))."""

    def __init__(self, x_shape, w_shape, attrs):
        self.n, self.c, *self.spatial = x_shape
        self.o, cg, *self.kernel = w_shape
        dims = len(self.kernel)
        self.groups = int(attrs.groups)
        self.stride = [int(v) for v in attrs.strides]
        self.dilation = [int(v) for v in attrs.dilation]
        self.pad_before = [int(v) for v in attrs.padding[:dims]]
        pad_after = [int(v) for v in attrs.padding[dims:]]
        self.out = [(size + pb + pa - d * (kk - 1) - 1) // s + 1 for size, pb, pa, d, kk, s in
                    zip(self.spatial, self.pad_before, pad_after, self.dilation, self.kernel, self.stride)]
        self.cg = cg
        self.pixels = math.prod(self.out)
        self.k = cg * math.prod(self.kernel)
        self.depthwise = cg == 1 and self.groups > 1
        # a few input channels (an image's RGB stem, a waveform): k is small and col, k * pixels, is
        # as large as the input times the taps: the window rule convolves directly from the padded
        # input in cache instead, with no col buffer to write, pack and read again
        self.direct = self.groups == 1 and cg <= DIRECT_MAX_CHANNELS and self.k <= DIRECT_MAX_TAPS
        # pixels as the GEMM's rows (o its columns) where pixels as columns would pad more than
        # MAX_PIXEL_PAD of them: 7 x 7 = 49 columns padded to 64 computed 1.3x the work
        self.pixel_rows = self.pads_pixels(PIXEL_TILE)
        self.pointwise = (all(kk == 1 for kk in self.kernel) and all(s == 1 for s in self.stride)
                          and not any(self.pad_before) and not any(pad_after))
        # the flat gather (_pad_flat, _shifted): a stride-1 conv's input zero-padded once, rows of
        # flat_width, so that tap t of pixel q reads padded[q + offset(t)]; the GEMM computes
        # flat_width - out[-1] junk columns per output row, which the crop drops
        self.padded = [size + pb + pa for size, pb, pa in zip(self.spatial, self.pad_before, pad_after)]
        self.flat_width = self.padded[-1]
        rows = math.prod(self.out[:-1]) * self.flat_width if len(self.out) > 1 else self.pixels
        self.flat_pixels = -(-rows // PIXEL_TILE) * PIXEL_TILE  # whole j tiles: the GEMM reads col in place
        strides = [math.prod(self.padded[a + 1:]) for a in range(len(self.padded))]
        self.flat_offsets = strides  # element strides of the padded input's spatial axes
        reach = sum(d * (kk - 1) * st for d, kk, st in zip(self.dilation, self.kernel, strides))
        inner = math.prod(self.padded[1:])  # the zeros after the input: rows of the first spatial axis
        self.flat_shape = [-(-(self.flat_pixels + reach) // inner), *self.padded[1:]]
        # 2-D only: a conv1d's packed gather has no row index to split (the audio stem's conv1 was
        # as fast either way)
        self.shifted = (len(self.out) == 2 and all(s == 1 for s in self.stride) and not self.pointwise
                        and not self.pixel_rows and self.flat_pixels - self.pixels <= MAX_JUNK * self.pixels)


    def pads_pixels(self, tile: int) -> bool:
        """Whether the pixels as columns of ``tile``-wide tiles pad more than MAX_PIXEL_PAD and o
        as columns would not."""
        padding = -(-self.pixels // tile) * tile - self.pixels
        return padding > MAX_PIXEL_PAD * self.pixels and (self.o // self.groups) % tile == 0


def conv_shape(call) -> ConvShape | None:
    """The geometry of ``call`` when it is a float NCHW/NCW conv with static shapes, else None."""
    name = getattr(call.op, "name", None)
    if name not in CONV_OPS:
        return None
    a = call.attrs
    if (a.data_layout, a.kernel_layout, a.out_layout) != LAYOUTS[name]:
        return None
    try:
        x_shape = [int(d) for d in call.args[0].ty.shape]
        w_shape = [int(d) for d in call.args[1].ty.shape]
    except (TypeError, AttributeError):  # symbolic or unknown shapes
        return None
    dtype = str(call.args[0].ty.dtype)
    out_dtype = str(a.out_dtype) if a.out_dtype is not None else ""
    if not dtype.startswith("float") or out_dtype not in ("", "void", dtype) or str(call.args[1].ty.dtype) != dtype:
        return None
    return ConvShape(x_shape, w_shape, a)


def _im2col(x, conv: ConvShape, dtype: str | None = None):
    """col[n, (g,) k, p]: k = (channel in group, *kernel taps) and p = output pixel, row-major;
    ``dtype``: converted to it as gathered (bf16: the conversion's one pass over col)."""
    from tvm import te, tirx

    grouped = conv.groups > 1

    def gather(n, *idx):
        g, k, p = idx if grouped else (0, *idx)
        taps, out = [], []  # peel the row-major indices apart, last axis first
        for size in reversed(conv.kernel):
            taps.insert(0, k % size)
            k = k // size
        for size in reversed(conv.out):
            out.insert(0, p % size)
            p = p // size
        c = g * conv.cg + k
        pos = [o * s + t * d - b for o, s, t, d, b in zip(out, conv.stride, taps, conv.dilation, conv.pad_before)]
        if not any(conv.pad_before) and _no_pad_after(conv):
            return cast(x[(n, c, *pos)])
        inside = tirx.all(*[tirx.all(q >= 0, q < size) for q, size in zip(pos, conv.spatial)])
        # the load is clamped into the input too: a vectorised select may evaluate both sides
        safe = [tirx.max(tirx.min(q, size - 1), 0) for q, size in zip(pos, conv.spatial)]
        return tirx.if_then_else(inside, cast(x[(n, c, *safe)]), tirx.const(0, dtype or x.dtype))

    def cast(value):
        return value.astype(dtype) if dtype and dtype != x.dtype else value

    shape = [conv.n] + ([conv.groups] if grouped else []) + [conv.k, conv.pixels]
    return te.compute(shape, gather, name="im2col", attrs={IM2COL: [conv.cg, *conv.kernel, *conv.out]})


def _pad_flat(x, conv: ConvShape):
    """xp[n, c, *conv.flat_shape]: the input zero-padded (conv.padded), with the zeros after it
    that the last row's junk columns and the tail read (more rows)."""
    from tvm import te, tirx

    def pad(n, c, *pos):
        src = [q - b for q, b in zip(pos, conv.pad_before)]
        inside = tirx.all(*[tirx.all(q >= 0, q < size) for q, size in zip(src, conv.spatial)])
        safe = [tirx.max(tirx.min(q, size - 1), 0) for q, size in zip(src, conv.spatial)]
        return tirx.if_then_else(inside, x[(n, c, *safe)], tirx.const(0, x.dtype))

    return te.compute([conv.n, conv.c, *conv.flat_shape], pad, name="conv_pad")


def _shifted(xp, conv: ConvShape):
    """col[n, (g,) k, q] = xp[n, c, q + offset(taps)]: q runs over out rows x conv.flat_width, so
    every col row is a contiguous slice of xp (no per-pixel index arithmetic, no bounds test)."""
    from tvm import te

    grouped = conv.groups > 1
    strides = conv.flat_offsets

    def gather(n, *idx):
        g, k, q = idx if grouped else (0, *idx)
        offset = 0
        for size, d, stride in reversed(list(zip(conv.kernel, conv.dilation, strides))):
            offset = offset + (k % size) * (d * stride)
            k = k // size
        flat, pos = q + offset, []  # xp's own axes: the buffer's flattening makes them flat + offset again
        for size in reversed(conv.flat_shape[1:]):
            pos.insert(0, flat % size)
            flat = flat // size
        return xp[(n, g * conv.cg + k, flat, *pos)]

    shape = [conv.n] + ([conv.groups] if grouped else []) + [conv.k, conv.flat_pixels]
    return te.compute(shape, gather, name="im2col", attrs={IN_PLACE: 1})


def _no_pad_after(conv: ConvShape) -> bool:
    """True when no output tap reads past the input's end (only the padding after can cause it)."""
    return all((o - 1) * s + (kk - 1) * d < size for o, s, kk, d, size in
               zip(conv.out, conv.stride, conv.kernel, conv.dilation, conv.spatial))


def _gemm(w2, col, conv: ConvShape, pixels: int | None = None):
    """out[n, (g,) o, p] = sum_k w2[(n,) (g,) o, k] * col[n, (g,) k, p]: w2 carries the image axis
    when there are several images (broadcast at compile time), so that every operand has it."""
    from tvm import te

    r = te.reduce_axis((0, conv.k), name="k")
    lead = int(conv.n > 1)

    def f32(value):  # bf16 operands accumulate in fp32, as a bf16 matmul's
        return value.astype("float32") if str(value.dtype) != "float32" else value

    def product(n, *idx):
        *g, o, p = idx
        w, x = f32(w2[(*([n] * lead), *g, o, r)]), f32(col[(n, *g, r, p)])
        return te.sum(x * w if conv.pixel_rows else w * x, axis=r)  # the first operand: the rule's rows

    shape = [conv.n] + ([conv.groups] if conv.groups > 1 else []) + [conv.o // conv.groups, pixels or conv.pixels]
    return te.compute(shape, product, name="conv_gemm")
