/* Intel AMX for effc's C tiles (bf16_tile.c, int8_tile.c): whether this process may use the tile
   units, and the one tile configuration they use.

   AMX is used only when the CPU has it (CPUID.7.0:EDX bits 22 AMX-BF16, 24 AMX-TILE, 25 AMX-INT8),
   the OS saves tile state (XCR0 bits 17, 18) and Linux granted this process tile data
   (arch_prctl ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18; without it the first tile
   instruction kills the process with SIGILL). The request runs once, when the library holding the
   kernels is loaded (a constructor), so it precedes the first call on any thread; the answer is
   cached. EFFC_AMX=0 in the environment turns the tile path off (the AVX-512 path runs instead:
   for comparisons, and for tests of both paths on one machine).

   The configuration (palette 1): tiles 0-3 accumulators (16 x 16 fp32 or int32), 4-5 A (16 rows x
   64 bytes), 6-7 B (16 rows of k pairs / quads x 64 bytes); a row block of fewer than 16 rows
   configures its A and C tiles with just those rows, so a tile never reads or writes past a matrix.
   Each call reads the thread's configuration once (effc_amx_begin), loads effc's only where it
   differs, and puts back one another library in the process (ONNX Runtime, oneDNN) had loaded
   (effc_amx_end). */
#ifndef EFFC_AMX_H
#define EFFC_AMX_H

#include <cpuid.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { EFFC_AMX_BF16 = 1, EFFC_AMX_INT8 = 2 };

static int effc_amx_granted = -1; /* EFFC_AMX_* bits, once known */

static int effc_amx_probe(void) {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24))) return 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return 0; /* OSXSAVE */
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return 0;
  const char *env = getenv("EFFC_AMX");
  if (env && strcmp(env, "0") == 0) return 0;
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return 0;
  __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx);
  return ((edx >> 22) & 1 ? EFFC_AMX_BF16 : 0) | ((edx >> 25) & 1 ? EFFC_AMX_INT8 : 0);
}

static inline int effc_amx(void) {
  int granted = __atomic_load_n(&effc_amx_granted, __ATOMIC_RELAXED);
  if (granted < 0) {
    granted = effc_amx_probe();
    __atomic_store_n(&effc_amx_granted, granted, __ATOMIC_RELAXED);
  }
  return granted;
}

__attribute__((constructor)) static void effc_amx_request(void) { effc_amx(); }

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} effc_tilecfg;

/* One call's use of the tiles: the configuration the thread had when the call began, and the rows of
   the two row blocks effc loaded (rows0 -1: none yet). */
typedef struct {
  effc_tilecfg saved;
  int rows0, rows1;
} effc_amx_state;

/* Tiles 0, 1 (accumulators) and 4 (A) of rows0 rows, 2, 3 and 5 of rows1, 6-7 (B) of 16; 64 bytes a row. */
static inline void effc_amx_fill(effc_tilecfg *cfg, int rows0, int rows1) {
  memset(cfg, 0, sizeof *cfg);
  cfg->palette = 1;
  for (int t = 0; t < 8; ++t) cfg->colsb[t] = 64, cfg->rows[t] = 16;
  cfg->rows[0] = cfg->rows[1] = cfg->rows[4] = (uint8_t)rows0;
  cfg->rows[2] = cfg->rows[3] = cfg->rows[5] = (uint8_t)rows1;
}

/* Before a call's first tile: what the thread has loaded (sttilecfg, some hundred cycles). */
static inline void effc_amx_begin(effc_amx_state *state) {
  _tile_storeconfig(&state->saved);
  state->rows0 = state->rows1 = -1;
}

/* Row blocks of rows0 and rows1 rows (effc_amx_fill), loaded only when the thread has another
   configuration (effc's own from its last call is the common case): each load costs about as much
   as a 32 x 32 x 64 bf16 product. */
static inline void effc_amx_configure(effc_amx_state *state, int rows0, int rows1) {
  if (state->rows0 == rows0 && state->rows1 == rows1) return;
  effc_tilecfg cfg;
  effc_amx_fill(&cfg, rows0, rows1);
  if (state->rows0 >= 0 || memcmp(&state->saved, &cfg, sizeof cfg) != 0) _tile_loadconfig(&cfg);
  state->rows0 = rows0, state->rows1 = rows1;
}

/* After a call's last tile: put back a configuration another library loaded. ONNX Runtime's MLAS and
   oneDNN configure a thread once and keep it between their calls: their tile products under effc's
   configuration raise #UD (a SIGILL) or compute on the wrong shapes. A thread that had none keeps
   effc's (whoever uses tiles on it next configures them), so effc's next call needs no reload. */
static inline void effc_amx_end(const effc_amx_state *state) {
  if (state->rows0 < 0 || !state->saved.palette) return;
  effc_tilecfg cfg;
  effc_amx_fill(&cfg, state->rows0, state->rows1);
  if (memcmp(&state->saved, &cfg, sizeof cfg) != 0) _tile_loadconfig(&state->saved);
}

/* The row blocks of the (up to) 32 rows from r0 of a `rows`-row matrix: count (1 or 2), rows each
   (n: 16, or all of a matrix of fewer) and where each starts. With 16 rows or more every block has
   16: one that would pass the last row starts earlier instead, overlapping the block before it
   (rows recomputed to the same values), so the tiles keep one configuration a call: a reload
   (ldtilecfg) costs about a 32 x 32 x 64 bf16 product, and a ragged m (vit's 197 tokens) would
   need two a call. */
typedef struct {
  int count, n, start[2];
} effc_amx_rows;

static inline effc_amx_rows effc_amx_row_blocks(int rows, int r0) {
  effc_amx_rows blocks;
  blocks.n = rows < 16 ? rows : 16;
  blocks.count = rows - r0 > 16 ? 2 : 1;
  blocks.start[0] = r0 + blocks.n > rows ? rows - blocks.n : r0;
  blocks.start[1] = r0 + 16 + blocks.n > rows ? rows - blocks.n : r0 + 16;
  return blocks;
}

/* Accumulator tile T (16 x 16 4-byte values: fp32 or int32), row block R's rows, column block V to
   cr[R] + 64 V, rows ld bytes apart: just the columns below cols, since c's rows may be only that
   wide (TVM sizes a ragged tile's buffer to the matrix). */
#define EFFC_AMX_STORE(T, R, V)                                                                    \
  do {                                                                                             \
    char *dst = cr[R] + (V) * 64;                                                                  \
    int n = (R) ? rows1 : rows0;                                                                   \
    if ((V) * 16 + 16 <= cols) {                                                                   \
      _tile_stored(T, dst, ld);                                                                    \
    } else {                                                                                       \
      _tile_stored(T, edge, 64);                                                                   \
      for (int r = 0; r < n; ++r) memcpy(dst + r * ld, edge + r * 16, (cols - (V) * 16) * 4);      \
    }                                                                                              \
  } while (0)

/* The accumulators of rb row blocks (rows0, rows1 rows at cr[0], cr[1]) x cb column blocks (tiles
   0-3: r * 2 + v for two row blocks, v for one) to c, its columns below cols. */
static inline void effc_amx_store(int rb, int cb, char *const cr[2], int64_t ld, int rows0, int rows1, int cols) {
  uint32_t edge[16 * 16];
  if (rb == 2) {
    EFFC_AMX_STORE(0, 0, 0);
    EFFC_AMX_STORE(2, 1, 0);
    if (cb == 2) { EFFC_AMX_STORE(1, 0, 1); EFFC_AMX_STORE(3, 1, 1); }
    return;
  }
  EFFC_AMX_STORE(0, 0, 0);
  if (cb > 1) EFFC_AMX_STORE(1, 0, 1);
  if (cb > 2) EFFC_AMX_STORE(2, 0, 2);
  if (cb > 3) EFFC_AMX_STORE(3, 0, 3);
}

#endif
