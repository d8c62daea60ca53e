"""effc/kernels/bf16_tile.c called directly: each tile shape, edge and operand form (a bf16 or fp32,
b a packed panel or a plain computed matrix, odd k, k below and above a 32-value AMX step) against
numpy on the same bf16-rounded operands, on the AMX tile path and on the AVX-512 BF16 vector path
(EFFC_AMX=0, in a child process: the choice is made once per process)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from effc.codegen.target import _cpuinfo_flags

HAS_BF16 = "avx512_bf16" in _cpuinfo_flags()
HAS_AMX = {"amx_tile", "amx_bf16"} <= _cpuinfo_flags()
pytestmark = pytest.mark.skipif(not HAS_BF16, reason="this CPU lacks AVX-512 BF16")

# (rows, cols, mr, nv, k): vector-sized tiles, AMX-sized ones (two row blocks, four column blocks),
# bottom/right edges (c's rows then just cols wide, as TVM sizes a ragged tile's buffer), k odd,
# below one AMX step, whole steps, whole steps plus a tail
CASES = [(6, 64, 6, 4, 64), (5, 48, 6, 4, 33), (12, 32, 12, 2, 7), (16, 16, 16, 1, 96), (32, 32, 32, 2, 768),
         (20, 32, 32, 2, 101), (1, 16, 32, 2, 31), (16, 64, 16, 4, 384), (9, 48, 16, 4, 65), (32, 16, 32, 2, 197),
         (5, 17, 5, 2, 33), (5, 17, 8, 2, 33), (6, 37, 6, 3, 11), (16, 11, 16, 1, 37), (20, 27, 32, 2, 64),
         (32, 49, 32, 4, 70), (40, 197, 64, 13, 64), (197, 197, 256, 13, 64), (5, 100, 16, 7, 33)]


def bf16(x):
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def run_cases() -> tuple[int, list[float]]:
    """(whether the tiles ran on AMX, each case's max relative error), in this process's mode."""
    from effc.kernels import native

    native.load("bf16_tile")
    lib = native._loaded["bf16_tile"]
    P = ctypes.c_void_p
    for fn in (lib.effc_bf16_tile_part, lib.effc_bf16_tile_rows):
        fn.restype = ctypes.c_int32
        fn.argtypes = [P] * 8 + [ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                                 ctypes.c_int32, ctypes.c_int64]
    rng = np.random.default_rng(1)
    errors = []
    for rows, cols, mr, nv, k in CASES:
        vecs = -(-cols // 16)
        for a_f32 in (False, True):
            for b_form in ("packed", "plain", "columns"):
                k2, nr = (k + 1) // 2, 16 * nv
                a = rng.standard_normal((mr, k + 3)).astype(np.float32)  # rows 3 wider than k: a stride
                w = rng.standard_normal((k, nr)).astype(np.float32)
                wb = bf16(w)
                ref = f32(bf16(a[:rows, :k])) @ f32(wb)[:, :cols]
                a_arg = a if a_f32 else bf16(a)
                fn = lib.effc_bf16_tile_rows if b_form == "columns" else lib.effc_bf16_tile_part
                if b_form == "plain":
                    b_arg = w if a_f32 else wb  # a plain [k, n] matrix, fp32 or bf16
                    b_row = b_arg[1:]
                elif b_form == "columns":  # its columns, k contiguous values each (attention's K rows)
                    b_arg = np.ascontiguousarray((w if a_f32 else wb).T)
                    b_row = b_arg[1:]
                else:  # the packed panel: [k2, nr, 2], zero past k
                    padded = np.zeros((2 * k2, nr), np.uint16)
                    padded[:k] = wb
                    b_arg = np.ascontiguousarray(padded.reshape(k2, 2, nr).transpose(0, 2, 1))
                    b_row = b_arg
                c = np.full((mr + 1, cols), np.nan, np.float32)  # a guard row: nothing written past rows
                addr = lambda x: x.ctypes.data  # noqa: E731
                es = a_arg.itemsize
                rc = fn(addr(c), addr(c) + cols * 4, addr(a_arg), addr(a_arg) + es, addr(a_arg) + a_arg.shape[1] * es,
                        addr(b_arg), addr(b_arg) + b_arg.itemsize, addr(b_row) if b_form != "packed" else addr(b_arg),
                        k2, mr, nv, 1, rows, cols, k)
                assert rc == 0, (rows, cols, mr, nv, k)
                assert np.isnan(c[rows:]).all(), (rows, cols, mr, nv, k)
                got = c[:rows]
                errors.append(float(np.abs(got - ref).max() / np.abs(ref).max()))
    return int(lib.effc_bf16_tile_amx()), errors


def _in_child(amx: str) -> tuple[int, list[float]]:
    code = "import json; from tests.kernels.test_bf16_tile import run_cases; print(json.dumps(run_cases()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "EFFC_AMX": amx}, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_vector_path_matches_numpy():
    used_amx, errors = _in_child("0")
    assert used_amx == 0
    assert max(errors) < 1e-5, errors


@pytest.mark.skipif(not HAS_AMX, reason="this CPU lacks AMX-BF16")
def test_amx_path_matches_numpy():
    used_amx, errors = _in_child("1")
    assert used_amx == 1
    assert max(errors) < 1e-5, errors


FOREIGN_CONFIG_PROGRAM = r"""
#include "bf16_tile.c"
#include <stdio.h>
/* A foreign library's configuration (palette 1, other rows) must survive effc's call; a thread with
   none keeps effc's afterwards. Prints: foreign_kept effc_kept_after_none */
int main(void) {
  effc_amx();
  static uint16_t a[32 * 64], b[32 * 32 * 2];
  static float c[32 * 32];
  effc_tilecfg foreign, now;
  memset(&foreign, 0, sizeof foreign);
  foreign.palette = 1;
  for (int t = 0; t < 8; ++t) foreign.colsb[t] = 32, foreign.rows[t] = 8;
  _tile_loadconfig(&foreign);
  effc_bf16_tile_part(c, c + 32, (char *)a, (char *)(a + 1), (char *)(a + 64), (char *)b, (char *)(b + 1),
                      (char *)b, 32, 32, 2, 1, 32, 32, 64);
  _tile_storeconfig(&now);
  int kept = memcmp(&now, &foreign, sizeof now) == 0;
  _tile_release();
  effc_bf16_tile_part(c, c + 32, (char *)a, (char *)(a + 1), (char *)(a + 64), (char *)b, (char *)(b + 1),
                      (char *)b, 32, 32, 2, 1, 32, 32, 64);
  _tile_storeconfig(&now);
  printf("%d %d\n", kept, now.palette == 1 && now.rows[0] == 16);
  return 0;
}
"""


@pytest.mark.skipif(not HAS_AMX, reason="this CPU lacks AMX-BF16")
def test_a_call_puts_back_the_threads_tile_configuration(tmp_path):
    """ONNX Runtime's MLAS and oneDNN configure a thread's tiles once and keep them: effc's call must
    leave a configuration it found as it was (else their next tile product faults or miscomputes)."""
    import shutil

    from effc.kernels import native

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    source = tmp_path / "foreign.c"
    source.write_text(FOREIGN_CONFIG_PROGRAM)
    exe = tmp_path / "foreign"
    subprocess.run([cc, *[f for f in native.FLAGS["bf16_tile"] if f != "-fPIC"], f"-I{native.HERE}", str(source),
                    "-o", str(exe)], check=True)
    assert subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split() == ["1", "1"]
