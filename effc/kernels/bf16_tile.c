/* The AVX-512 BF16 register tile of effc's bf16 matmul rule (effc/codegen/schedules/cpu/matmul_bf16.py).

   c[rows, cols] = a[rows, k] x b[k, cols], fp32 accumulation, c overwritten, within an mr x 16 nv tile
   (rows < mr, cols < 16 nv at the bottom and right edges of a matrix that no tile divides: a is read
   in place, never padded; k may be odd). b is one j-panel, each k pair of a column side by side, the
   layout vdpbf16ps multiplies (one 32-bit lane = two consecutive k of a column): a weight pre-packed
   at compile time, or a computed b (attention's K^T, V) read as a plain row-major [k, n] matrix and
   packed, vectorised, by the panel's first row tile (first != 0) into a per-thread buffer that the
   panel's other tiles reuse (the rule runs a panel's row tiles in order on one thread). a and b may
   be stored as bf16 (a kernel parameter) or as fp32 (a buffer inside the kernel: TVM's bf16
   legalisation widens those), so the caller passes the address of the next element and of the next
   row, which give the element size and the row strides whatever layout TVM chose
   (effc/codegen/bf16_tile_call.py). An fp32 a is rounded to bf16 (nearest even) chunk by chunk into
   a small buffer, once per tile; an fp32 b once per panel.
   Written in C because TVM 0.27's LLVM codegen has no bfloat vector type, which the LLVM 22
   intrinsic llvm.x86.avx512bf16.dpbf16ps.512 requires; the call is per tile (mr x nr x k MACs),
   so its cost is nil. Linked into model.so by effc's build (effc/kernels/native.py). */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "lanes.h"

#define MAX_ROWS 16
#define MAX_VECS 4
#define CHUNK_K 256 /* k per converted chunk: MAX_ROWS rows of a, or a panel of 64 columns, in 32 KiB */

/* n (even) floats at src -> bf16 at dst, rounded to nearest even. */
static void to_bf16(uint16_t *dst, const float *src, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(dst + i, (__m512i)v);
  }
  if (i < n) {
    int64_t rest = n - i;
    __mmask16 lo = effc_lane_mask(rest), hi = effc_lane_mask(rest - 16);
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, src + i + 16), _mm512_maskz_loadu_ps(lo, src + i));
    _mm512_mask_storeu_epi16(dst + i, rest >= 32 ? 0xFFFFFFFFu : (__mmask32)((1ull << rest) - 1), (__m512i)v);
  }
}

static __thread uint16_t *panel_bf16; /* this thread's converted fp32 panel */
static __thread int64_t panel_capacity;

/* The bf16 copy of fp32 panel b (2 k2 x nr values), converted when first, else the one made before. */
/* This thread's panel buffer, at least n values (NULL when out of memory); a new buffer holds no
   panel yet, so *first is set. */
static uint16_t *panel_buffer(int64_t n, int *first) {
  if (n > panel_capacity) {
    free(panel_bf16);
    panel_bf16 = (uint16_t *)malloc(n * sizeof(uint16_t));
    panel_capacity = panel_bf16 ? n : 0;
    *first = 1;
  }
  return panel_bf16;
}

static const uint16_t *panel_of(const float *b, int64_t n, int first) {
  if (panel_buffer(n, &first) && first) to_bf16(panel_bf16, b, n);
  return panel_bf16;
}

/* Row `row` of a plain row-major b (element size es: 2 bf16, 4 fp32; rows ldb elements apart), its
   columns c0.. where mask is set, as 16 bf16; zero past row k - 1. */
static inline __m256i row_of(const char *b, int es, int64_t ldb, int64_t row, int64_t k, int64_t c0, __mmask16 mask) {
  if (row >= k || !mask) return _mm256_setzero_si256();
  if (es == 2) return _mm256_maskz_loadu_epi16(mask, (const uint16_t *)b + row * ldb + c0);
  return (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, (const float *)b + row * ldb + c0));
}

/* The panel (k2 pairs x nr columns, each k pair of a column side by side) of a plain b: its first
   `cols` columns and k rows, zero beyond. Made when first (the panel's first row tile) into this
   thread's buffer, which the panel's later tiles reuse. */
static const uint16_t *panel_of_rows(const char *b, int es, int64_t ldb, int64_t k, int cols, int nr, int64_t k2,
                                     int first) {
  if (!panel_buffer(2 * k2 * nr, &first) || !first) return panel_bf16;
  for (int64_t kp = 0; kp < k2; ++kp)
    for (int c0 = 0; c0 < nr; c0 += 16) {
      int left = cols - c0;
      __mmask16 mask = effc_lane_mask(left);
      __m512i lo = _mm512_cvtepu16_epi32(row_of(b, es, ldb, 2 * kp, k, c0, mask));
      __m512i hi = _mm512_cvtepu16_epi32(row_of(b, es, ldb, 2 * kp + 1, k, c0, mask));
      _mm512_storeu_si512(panel_bf16 + (kp * nr + c0) * 2, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  return panel_bf16;
}

/* The panel (k2 pairs x nr columns) of a b given by columns (column c's k values contiguous, columns
   ld elements apart, element size es): its first `cols` columns, zero beyond and past k. Each k pair
   of a column is one 32-bit word of that column: 16 columns' words gathered per store. Made when
   first, as panel_of_rows. */
static const uint16_t *panel_of_columns(const char *b, int es, int64_t ld, int64_t k, int cols, int nr, int64_t k2,
                                        int first) {
  if (!panel_buffer(2 * k2 * nr, &first) || !first) return panel_bf16;
  uint32_t *panel = (uint32_t *)panel_bf16;
  int64_t whole = es == 2 ? k / 2 : 0; /* pairs read as words; an odd k's last pair, fp32 b: element-wise */
  for (int c0 = 0; c0 < nr; c0 += 16) {
    int left = cols - c0;
    __mmask16 mask = effc_lane_mask(left);
    __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32((int)ld));
    const char *base = b + (int64_t)c0 * ld * es;
    for (int64_t kp = 0; kp < whole; ++kp) {
      __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, column, base + kp * 4, 2);
      _mm512_storeu_si512(panel + kp * nr + c0, words);
    }
    for (int64_t kp = whole; kp < k2; ++kp)
      for (int c = 0; c < 16; ++c) {
        uint32_t word = 0;
        for (int e = 0; e < 2; ++e) {
          int64_t kk = 2 * kp + e;
          if (c >= left || kk >= k) continue;
          uint16_t v;
          if (es == 2) {
            memcpy(&v, base + ((int64_t)c * ld + kk) * 2, 2);
          } else {
            uint32_t f; /* fp32 bits, rounded to bf16 (nearest even) as to_bf16 does */
            memcpy(&f, base + ((int64_t)c * ld + kk) * 4, 4);
            v = (uint16_t)((f + 0x7FFF + ((f >> 16) & 1)) >> 16);
          }
          word |= (uint32_t)v << (16 * e);
        }
        panel[kp * nr + c0 + c] = word;
      }
  }
  return panel_bf16;
}

/* acc[r] += a's pair (a[r, 2 kp], a[r, 2 kp + 1]) x the panel's k pair row bp, for mr rows; odd: a's
   row ends after its first element (the second is taken as 0: no read past the row). */
#define STEP(ODD)                                                                              \
  do {                                                                                         \
    __m512bh bv[MAX_VECS];                                                                     \
    for (int v = 0; v < nv; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(bp + (kp * ldb + v * 16) * 2); \
    for (int r = 0; r < mr; ++r) {                                                             \
      int32_t pair = 0;                                                                        \
      memcpy(&pair, ap + r * ap_ld + 2 * kp, (ODD) ? sizeof(uint16_t) : sizeof pair);         \
      __m512bh av = (__m512bh)_mm512_set1_epi32(pair);                                         \
      for (int v = 0; v < nv; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);         \
    }                                                                                          \
  } while (0)

/* c[mr, 16 nv] = a[mr, kk] x the first nv vectors of a panel ldb columns wide (ldb >= 16 nv). */
static inline __attribute__((always_inline)) void tile(float *c, int64_t ldc, const void *a, int64_t lda, int a_f32,
                                                       const void *b, int64_t ldb, int64_t kk, const int mr,
                                                       const int nv, int cols) {
  __m512 acc[MAX_ROWS][MAX_VECS];
  uint16_t a_buf[MAX_ROWS * CHUNK_K];
  for (int r = 0; r < mr; ++r)
    for (int v = 0; v < nv; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < kk; k0 += CHUNK_K) {
    int64_t kc = kk - k0 < CHUNK_K ? kk - k0 : CHUNK_K;
    const uint16_t *ap;
    int64_t ap_ld;
    if (a_f32) {
      for (int r = 0; r < mr; ++r) to_bf16(a_buf + r * CHUNK_K, (const float *)a + r * lda + k0, kc);
      ap = a_buf, ap_ld = CHUNK_K;
    } else {
      ap = (const uint16_t *)a + k0, ap_ld = lda;
    }
    const uint16_t *bp = (const uint16_t *)b + k0 * ldb; /* b_f32: the caller passes the converted panel */
    int64_t kp = 0;
    for (; kp < kc / 2; ++kp) STEP(0);
    if (kc & 1) STEP(1);
  }
  for (int r = 0; r < mr; ++r)
    for (int v = 0; v < nv; ++v) _mm512_mask_storeu_ps(c + r * ldc + v * 16, effc_lane_mask(cols - v * 16), acc[r][v]);
}


/* ---- AMX (tdpbf16ps): where the CPU and the OS allow it (amx.h), the whole tile in 16 x 16 tiles. ----
   A row block is 16 rows of a (fewer at the bottom edge: the tiles are configured with just those
   rows), a column block 16 columns of the panel; a k step 32 values (16 pairs: one 64-byte tile
   row). Two row blocks x two column blocks (4 accumulators, 2 A and 2 B tiles) or one row block x
   up to four column blocks (B tiles reloaded). The last k step, when k is no multiple of 32, reads
   zero-padded copies of a's and b's last columns and pairs (a tile row is always 64 bytes). */
#define AMX_K 32

#define DP(C, A, B) _tile_dpbf16ps(C, A, B)
/* one k step of rb row blocks x cb column blocks: a row block's A from ap[r] (stride as), column v's B
   from bp[v] (stride bs) */
static inline __attribute__((always_inline)) void amx_step(int rb, int cb, const void *const ap[2], int64_t as,
                                                           const void *const bp[4], int64_t bs) {
  if (rb == 2) {
    _tile_loadd(4, ap[0], as);
    _tile_loadd(5, ap[1], as);
    _tile_loadd(6, bp[0], bs);
    DP(0, 4, 6);
    DP(2, 5, 6);
    if (cb == 2) {
      _tile_loadd(7, bp[1], bs);
      DP(1, 4, 7);
      DP(3, 5, 7);
    }
    return;
  }
  _tile_loadd(4, ap[0], as);
  _tile_loadd(6, bp[0], bs);
  DP(0, 4, 6);
  if (cb > 1) { _tile_loadd(7, bp[1], bs); DP(1, 4, 7); }
  if (cb > 2) { _tile_loadd(6, bp[2], bs); DP(2, 4, 6); }
  if (cb > 3) { _tile_loadd(7, bp[3], bs); DP(3, 4, 7); }
}

/* c[rows, 16 vecs] = a[rows, k] (bf16, rows lda apart) x panel b (k2 pairs x ldb columns, pairs
   side by side), in the row blocks of effc_amx_row_blocks. */
static void amx_tile(float *c, int64_t ldc, const uint16_t *a, int64_t lda, const uint16_t *b, int64_t ldb,
                     int64_t k, int rows, int vecs, int cols) {
  uint16_t a_tail[2][16 * AMX_K], b_tail[4][16 * AMX_K];
  int64_t k_full = k / AMX_K * AMX_K, tail = k - k_full;
  int n = rows < 16 ? rows : 16; /* rows of every row block (effc_amx_row_blocks) */
  effc_amx_state state;
  effc_amx_begin(&state);
  effc_amx_configure(&state, n, n);
  for (int r0 = 0; r0 < rows; r0 += 32) {
    effc_amx_rows row_blocks = effc_amx_row_blocks(rows, r0);
    int rb = row_blocks.count, *start = row_blocks.start;
    const uint16_t *ar[2] = {a + start[0] * lda, a + start[1] * lda};
    float *const cr[2] = {c + start[0] * ldc, c + start[1] * ldc};
    if (tail) /* a's last columns, zero-padded to a whole k step */
      for (int blk = 0; blk < rb; ++blk)
        for (int r = 0; r < n; ++r) {
          uint16_t *dst = a_tail[blk] + r * AMX_K;
          memset(dst, 0, AMX_K * sizeof *dst);
          memcpy(dst, ar[blk] + r * lda + k_full, tail * sizeof *dst);
        }
    for (int v0 = 0; v0 < vecs; v0 += rb == 2 ? 2 : 4) {
      int cb = vecs - v0 < (rb == 2 ? 2 : 4) ? vecs - v0 : (rb == 2 ? 2 : 4);
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k0 = 0; k0 < k_full; k0 += AMX_K) {
        const void *ap[2] = {ar[0] + k0, ar[1] + k0};
        const uint16_t *bk = b + (k0 / 2 * ldb + v0 * 16) * 2;
        const void *bp[4] = {bk, bk + 32, bk + 64, bk + 96};
        amx_step(rb, cb, ap, lda * 2, bp, ldb * 4);
      }
      if (tail) {
        int64_t pairs = (tail + 1) / 2;
        for (int v = 0; v < cb; ++v) {
          memset(b_tail[v], 0, sizeof b_tail[v]);
          for (int64_t p = 0; p < pairs; ++p)
            memcpy(b_tail[v] + p * AMX_K, b + ((k_full / 2 + p) * ldb + (v0 + v) * 16) * 2, AMX_K * sizeof(uint16_t));
        }
        const void *ap[2] = {a_tail[0], a_tail[1]};
        const void *bp[4] = {b_tail[0], b_tail[1], b_tail[2], b_tail[3]};
        amx_step(rb, cb, ap, AMX_K * 2, bp, AMX_K * 2);
      }
      char *const cv[2] = {(char *)(cr[0] + v0 * 16), (char *)(cr[1] + v0 * 16)};
      effc_amx_store(rb, cb, cv, ldc * 4, n, n, cols - v0 * 16);
    }
  }
  effc_amx_end(&state);
}

static __thread uint16_t *a_bf16; /* this thread's bf16 copy of an fp32 a tile */
static __thread int64_t a_capacity;

#define CASE(R, V) case (R) * 8 + (V): tile(c, ldc, a, lda, a_f32, b, ldb, k, R, V, cols); return 0;
#define ROWS(R) CASE(R, 1) CASE(R, 2) CASE(R, 3) CASE(R, 4)
static const int VECTOR_ROWS[5] = {0, 16, 12, 8, 6}; /* vectors -> most rows of a compiled vector tile */

/* The vector (vdpbf16ps) tile: rows <= VECTOR_ROWS[vecs], vecs <= 4 of a panel ldb columns wide; 0,
   or -1 where none is compiled. */
static int vector_tile(float *c, int64_t ldc, const void *a, int64_t lda, int a_f32, const void *b, int64_t ldb,
                       int64_t k, int rows, int vecs, int cols) {
  switch (rows * 8 + vecs) {
    ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6)
    CASE(7, 1) CASE(7, 2) CASE(7, 3) CASE(8, 1) CASE(8, 2) CASE(8, 3)
    CASE(9, 1) CASE(9, 2) CASE(10, 1) CASE(10, 2) CASE(11, 1) CASE(11, 2) CASE(12, 1) CASE(12, 2)
    CASE(13, 1) CASE(14, 1) CASE(15, 1) CASE(16, 1)
  }
  return -1;
}

/* Addresses: c, c one row down; a, a one element on, a one row down; b, b one element on, b one row
   down. The tile is mr x 16 nv over k2 pairs of k; first: this is the first row tile of b's panel.
   b is a panel 16 nv columns wide, zero-padded to k2 pairs (b_row == b), or, b_row != b, a plain
   row-major [k, n] matrix (a computed operand read in place) whose panel the first row tile packs.
   Of the tile, rows x cols are computed (the tile at the bottom or right edge of a matrix whose m
   or n no tile divides: the rest of c is left as it was, and the caller discards it; cols rounded
   up to whole vectors) from the first k of a's columns (k odd: a's rows are read in place,
   unpadded). 0 when (rows, vectors) has a compiled tile and memory for a converted panel; -1
   otherwise (the rule never asks for a missing tile). */
static int32_t tile_part(float *c, float *c_row, const char *a, const char *a_next, const char *a_row, const char *b,
                         const char *b_next, const char *b_row, int64_t k2, int32_t mr, int32_t nv, int32_t first,
                         int32_t rows, int32_t cols, int64_t k, int b_transposed) {
  int64_t ldc = c_row - c;
  int a_f32 = a_next - a == 4;
  int64_t lda = (a_row - a) / (a_f32 ? 4 : 2);
  int vecs = (cols + 15) / 16;
  if (rows > mr || vecs > nv || k > 2 * k2) return -1;
  if (b_transposed) {
    int es = (int)(b_next - b);
    b = (const char *)panel_of_columns(b, es, (b_row - b) / es, k, cols, nv * 16, k2, first);
    if (!b) return -1;
  } else if (b_row != b) {
    int es = (int)(b_next - b);
    b = (const char *)panel_of_rows(b, es, (b_row - b) / es, k, cols, nv * 16, k2, first);
    if (!b) return -1;
  } else if (b_next - b == 4) {
    b = (const char *)panel_of((const float *)b, 2 * k2 * nv * 16, first);
    if (!b) return -1;
  }
  if (rows <= 0 || vecs <= 0) return 0;
  if (effc_amx() & EFFC_AMX_BF16) {
    const uint16_t *ab = (const uint16_t *)a;
    if (a_f32) { /* rounded to bf16 once per tile, as the vector path does chunk by chunk */
      int64_t n = (int64_t)rows * k;
      if (n > a_capacity) {
        free(a_bf16);
        a_bf16 = (uint16_t *)malloc(n * sizeof(uint16_t));
        a_capacity = a_bf16 ? n : 0;
        if (!a_bf16) return -1;
      }
      for (int r = 0; r < rows; ++r) to_bf16(a_bf16 + r * k, (const float *)a + r * lda, k);
      ab = a_bf16, lda = k;
    }
    amx_tile(c, ldc, ab, lda, (const uint16_t *)b, 16 * nv, k, rows, vecs, cols);
    return 0;
  }
  /* taller or wider tiles than the vector registers hold (the AMX rule's) run as several vector
     tiles: groups of at most 4 vectors, each as many rows as its registers hold */
  int64_t a_step = lda * (a_f32 ? 4 : 2);
  for (int v0 = 0; v0 < vecs; v0 += 4) {
    int group = vecs - v0 < 4 ? vecs - v0 : 4;
    const uint16_t *bg = (const uint16_t *)b + v0 * 16 * 2;
    for (int r0 = 0; r0 < rows; r0 += VECTOR_ROWS[group]) {
      int part = rows - r0 < VECTOR_ROWS[group] ? rows - r0 : VECTOR_ROWS[group];
      if (vector_tile(c + r0 * ldc + v0 * 16, ldc, a + r0 * a_step, lda, a_f32, bg, 16 * nv, k, part, group,
                      cols - v0 * 16))
        return -1;
    }
  }
  return 0;
}

int32_t effc_bf16_tile_part(float *c, float *c_row, const char *a, const char *a_next, const char *a_row,
                            const char *b, const char *b_next, const char *b_row, int64_t k2, int32_t mr, int32_t nv,
                            int32_t first, int32_t rows, int32_t cols, int64_t k) {
  return tile_part(c, c_row, a, a_next, a_row, b, b_next, b_row, k2, mr, nv, first, rows, cols, k, 0);
}

/* As effc_bf16_tile_part with b given as its columns: b_row is the address of b's next column, each
   column k contiguous values (attention's K rows for Q.K^T, effc.codegen.product_nt). */
int32_t effc_bf16_tile_rows(float *c, float *c_row, const char *a, const char *a_next, const char *a_row,
                            const char *b, const char *b_next, const char *b_row, int64_t k2, int32_t mr, int32_t nv,
                            int32_t first, int32_t rows, int32_t cols, int64_t k) {
  return tile_part(c, c_row, a, a_next, a_row, b, b_next, b_row, k2, mr, nv, first, rows, cols, k, 1);
}

/* The whole tile (rows = mr, cols = 16 nv, k = 2 k2) of a packed b: the entry point of modules built
   before the partial tiles. */
int32_t effc_bf16_tile(float *c, float *c_row, const char *a, const char *a_next, const char *a_row, const char *b,
                       const char *b_next, int64_t k2, int32_t mr, int32_t nv, int32_t first) {
  return effc_bf16_tile_part(c, c_row, a, a_next, a_row, b, b_next, b, k2, mr, nv, first, mr, 16 * nv, 2 * k2);
}

/* 1 when this process's tiles run on AMX (amx.h), else 0: for tests and `effc bench`'s notes. */
int32_t effc_bf16_tile_amx(void) { return (effc_amx() & EFFC_AMX_BF16) != 0; }
