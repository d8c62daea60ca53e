"""effc/kernels/int8_tile.c called directly: tile shapes, bottom and right edges (c's rows then just
cols wide, as TVM may size a ragged tile's buffer), k below one 64-byte AMX step, whole steps and
whole steps plus a tail, k no multiple of 4, both sign orders (u8 x s8, s8 x u8), against numpy's
exact int32 product, on the AMX tile path and on the AVX-512 VNNI path (EFFC_AMX=0, in a child
process: the choice is made once per process). A guard row and guard columns catch stores past the
tile; a is read in place, so it ends at an unreadable page: a read past its rows' k bytes or past
its last valid row kills the child."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import pytest

from effc.codegen.target import cpuinfo_flags
from tests.kernels.amx_child import run_cases_in_child

HAS_VNNI = "avx512_vnni" in cpuinfo_flags()
HAS_AMX = {"amx_tile", "amx_int8"} <= cpuinfo_flags()
pytestmark = pytest.mark.skipif(not HAS_VNNI, reason="this CPU lacks AVX-512 VNNI")
GUARD = -123456789

# (rows, cols, mr, nr, k): whole AMX tiles (two row blocks x two column blocks, one row block x four),
# bottom edges (rows < 16, 16 < rows < 32), right edges (cols no multiple of 16), k below 64, 64,
# whole steps plus a tail, k no multiple of 4 (a's last quad partial); VNNI sub-tiles (rows no
# multiple of 6, 3 column vectors)
CASES = [(32, 32, 32, 32, 768), (16, 64, 16, 64, 256), (5, 32, 32, 32, 768), (20, 32, 32, 32, 200),
         (32, 20, 32, 32, 64), (1, 16, 32, 32, 4), (17, 49, 32, 64, 28), (32, 48, 32, 48, 132),
         (13, 7, 16, 16, 3072), (31, 33, 32, 64, 68), (9, 64, 16, 64, 60), (32, 32, 32, 32, 1540),
         (20, 40, 32, 48, 197), (32, 32, 32, 32, 63), (7, 16, 16, 16, 1), (18, 64, 32, 64, 130)]
PAGE = mmap.PAGESIZE


def guarded(nbytes: int) -> np.ndarray:
    """nbytes writable bytes ending where an unreadable page begins."""
    pages = -(-nbytes // PAGE)
    mem = mmap.mmap(-1, (pages + 1) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(base + pages * PAGE, PAGE, 0) == 0, ctypes.get_errno()
    _keep.append(mem)
    return np.frombuffer(mem, np.uint8, nbytes, pages * PAGE - nbytes)


_keep: list = []  # the guarded mappings stay open for the process's life


def run_cases() -> tuple[int, list[bool]]:
    """(whether the tiles ran on AMX, each case's exactness), in this process's mode."""
    from effc.kernels import native

    native.load("int8_tile")
    lib = native._loaded["int8_tile"]
    fn = lib.effc_int8_tile
    fn.restype = ctypes.c_int32
    P = ctypes.c_void_p
    fn.argtypes = [P] * 6 + [ctypes.c_int64] + [ctypes.c_int32] * 5
    rng = np.random.default_rng(3)
    ok = []
    for rows, cols, mr, nr, k in CASES:
        for a_signed in (0, 1):
            a_type, b_type = (np.int8, np.uint8) if a_signed else (np.uint8, np.int8)
            info_a, info_b = np.iinfo(a_type), np.iinfo(b_type)
            lda = k + 5  # rows 5 wider than k: a stride; the last valid row's k bytes end at the guard page
            a = guarded((rows - 1) * lda + k).view(a_type)
            a[:] = rng.integers(info_a.min, info_a.max + 1, a.size, dtype=a_type)
            rows_of_a = np.lib.stride_tricks.as_strided(a, (rows, k), (lda, 1))
            w = rng.integers(info_b.min, info_b.max + 1, (k, nr), dtype=b_type)
            ref = rows_of_a.astype(np.int64) @ w[:, :cols].astype(np.int64)
            quads = -(-k // 4)
            padded = np.zeros((4 * quads, nr), b_type)
            padded[:k] = w
            panel = np.ascontiguousarray(padded.reshape(quads, 4, nr).transpose(0, 2, 1))  # [k / 4, nr, 4], 0 past k
            # c's rows just cols wide, plus a guard row and, in a second buffer, guard columns
            c = np.full((mr + 1, cols), GUARD, np.int32)
            wide = np.full((mr + 1, nr + 3), GUARD, np.int32)
            addr = lambda x: x.ctypes.data  # noqa: E731
            good = True
            for out, ldc in ((c, cols), (wide, nr + 3)):
                rc = fn(addr(out), addr(out) + ldc * 4, addr(a), addr(a) + lda, addr(panel), addr(panel) + nr * 4,
                        k, mr, nr, rows, cols, a_signed)
                good &= rc == 0 and (out[rows:] == GUARD).all() and (out[:rows, :cols] == ref).all()
                good &= (out[:, cols:] == GUARD).all()
            ok.append(bool(good))
    return int(lib.effc_int8_tile_amx()), ok


def _in_child(amx: str):
    return run_cases_in_child("tests.kernels.test_int8_tile", amx)


def test_vnni_path_is_exact():
    used_amx, ok = _in_child("0")
    assert used_amx == 0
    assert all(ok), ok


@pytest.mark.skipif(not HAS_AMX, reason="this CPU lacks AMX-INT8")
def test_amx_path_is_exact():
    used_amx, ok = _in_child("1")
    assert used_amx == 1
    assert all(ok), ok


def test_out_of_range_arguments_are_refused():
    from effc.kernels import native

    native.load("int8_tile")
    fn = native._loaded["int8_tile"].effc_int8_tile
    fn.restype = ctypes.c_int32
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] + [ctypes.c_int32] * 5
    buf = np.zeros(4096, np.int32)
    p = buf.ctypes.data
    assert fn(p, p + 128, p, p + 64, p, p + 64, 64, 32, 32, 32, 32, 0) == -1  # quads closer than nr columns
    assert fn(p, p + 128, p, p + 64, p, p + 128, 64, 16, 32, 17, 32, 0) == -1  # rows > mr
    assert fn(p, p + 128, p, p + 64, p, p + 128, 64, 32, 24, 32, 24, 0) == -1  # nr no multiple of 16
