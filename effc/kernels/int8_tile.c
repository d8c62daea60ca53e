/* The int8 tile of effc's int8 matmul rule on AMX (effc/codegen/schedules/cpu/int8_matmul.py,
   lowered by effc/codegen/int8_tile_call.py).

   c[rows, cols] = a[rows, k] x b[k, cols] in int32, c overwritten, within an mr x nr tile (rows < mr,
   cols < nr at the bottom and right edges of a matrix that no tile divides). a is row-major bytes
   (rows lda apart, k contiguous); b is one j-panel packed as [k / 4, nr, 4] (each k quad of a column
   side by side: the layout of an AMX B tile and of vpdpbusd's operand), quads ldb bytes apart. The
   signs: u8 a x s8 b (a linear: activation x weight, tdpbusd) or s8 a x u8 b (a conv: weight x
   im2col, tdpbsud). Of a, just the first k bytes of each row are read (a is read in place, never
   padded); b has ceil(k / 4) quads, zero past k (the rule packs it so).
   On AMX (amx.h) the tile runs in 16 x 16 int32 tiles: a row block is 16 rows of a (fewer only when
   the tile has fewer: tiles configured with just those rows), a column block 16 columns of b, a k step
   64 bytes (16 quads: one tile row). Two row blocks x two column blocks (4 accumulators, 2 A and 2 B
   tiles) or one row block x up to four column blocks. The last k step, when k is no multiple of 64,
   reads zero-padded copies of a's last columns and b's last quads. Without AMX (EFFC_AMX=0, or the
   OS grants no tile state) the same tile runs on AVX-512 VNNI (vpdpbusd) register tiles.
   Written in C because this TVM's tensorize crashes and its LLVM codegen has no AMX tile type; the
   call is per tile (mr x nr x k MACs), so its cost is nil. Linked into model.so by effc's build
   (effc/kernels/native.py). */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "amx.h"
#include "lanes.h"

#define AMX_K 64 /* bytes of k per tile row */
/* a's rows are prefetched this many bytes (two k steps) ahead: the tile reads 32 row streams, which
   the hardware prefetchers miss (measured on Emerald Rapids in the rule's loop order, 128 x 768 x 3072:
   1.38 -> 1.73 int8 TOP/s; 64 and 192 bytes about as good, 512 no gain) */
#define PREFETCH 128

/* one tile product, signs per tile: u8 x s8 (tdpbusd) or s8 x u8 (tdpbsud) */
#define DP(SA, C, A, B)              \
  do {                               \
    if (SA) _tile_dpbsud(C, A, B);   \
    else _tile_dpbusd(C, A, B);      \
  } while (0)

/* one k step of rb row blocks x cb column blocks: a row block's A from ap[r] (stride as), column
   block v's B from bp[v] (stride bs) */
static inline __attribute__((always_inline)) void amx_step(const int sa, int rb, int cb, const void *const ap[2],
                                                           int64_t as, const void *const bp[4], int64_t bs) {
  if (rb == 2) {
    _tile_loadd(4, ap[0], as);
    _tile_loadd(5, ap[1], as);
    _tile_loadd(6, bp[0], bs);
    DP(sa, 0, 4, 6);
    DP(sa, 2, 5, 6);
    if (cb == 2) {
      _tile_loadd(7, bp[1], bs);
      DP(sa, 1, 4, 7);
      DP(sa, 3, 5, 7);
    }
    return;
  }
  _tile_loadd(4, ap[0], as);
  _tile_loadd(6, bp[0], bs);
  DP(sa, 0, 4, 6);
  if (cb > 1) { _tile_loadd(7, bp[1], bs); DP(sa, 1, 4, 7); }
  if (cb > 2) { _tile_loadd(6, bp[2], bs); DP(sa, 2, 4, 6); }
  if (cb > 3) { _tile_loadd(7, bp[3], bs); DP(sa, 3, 4, 7); }
}

/* c[rows, 16 blocks] = a[rows, k] x panel b, in the row blocks of effc_amx_row_blocks (amx.h). */
static inline __attribute__((always_inline)) void amx_tile(const int sa, int32_t *c, int64_t ldc, const uint8_t *a,
                                                           int64_t lda, const uint8_t *b, int64_t ldb, int64_t k,
                                                           int rows, int blocks, int cols) {
  uint8_t a_tail[2][16 * AMX_K], b_tail[4][16 * AMX_K];
  int64_t k_full = k / AMX_K * AMX_K, tail = k - k_full, tail_quads = (tail + 3) / 4;
  __mmask64 tail_mask = tail ? (__mmask64)((1ull << tail) - 1) : 0;
  if (tail)
    for (int v = 0; v < 4; ++v) memset(b_tail[v] + tail_quads * 64, 0, (16 - tail_quads) * 64);
  int n = rows < 16 ? rows : 16; /* rows of every row block (effc_amx_row_blocks) */
  effc_amx_state state;
  effc_amx_begin(&state);
  effc_amx_configure(&state, n, n);
  for (int r0 = 0; r0 < rows; r0 += 32) {
    effc_amx_rows row_blocks = effc_amx_row_blocks(rows, r0);
    int rb = row_blocks.count, *start = row_blocks.start;
    const uint8_t *ar[2] = {a + start[0] * lda, a + start[1] * lda};
    int32_t *const cr[2] = {c + start[0] * ldc, c + start[1] * ldc};
    if (tail) /* a's last columns, zero-padded to a whole k step (a masked load reads just them) */
      for (int blk = 0; blk < rb; ++blk)
        for (int r = 0; r < n; ++r)
          _mm512_storeu_si512(a_tail[blk] + r * AMX_K, _mm512_maskz_loadu_epi8(tail_mask, ar[blk] + r * lda + k_full));
    for (int v0 = 0; v0 < blocks; v0 += rb == 2 ? 2 : 4) {
      int cb = blocks - v0 < (rb == 2 ? 2 : 4) ? blocks - v0 : (rb == 2 ? 2 : 4);
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k0 = 0; k0 < k_full; k0 += AMX_K) {
        if (k0 + PREFETCH < k)
          for (int blk = 0; blk < rb; ++blk)
            for (int r = 0; r < n; ++r) _mm_prefetch((const char *)ar[blk] + r * lda + k0 + PREFETCH, _MM_HINT_T0);
        const void *ap[2] = {ar[0] + k0, ar[1] + k0};
        const uint8_t *bk = b + k0 / 4 * ldb + v0 * 64;
        const void *bp[4] = {bk, bk + 64, bk + 128, bk + 192};
        amx_step(sa, rb, cb, ap, lda, bp, ldb);
      }
      if (tail) { /* b's last quads (its rows past them zeroed once, above) */
        for (int v = 0; v < cb; ++v)
          for (int64_t q = 0; q < tail_quads; ++q)
            _mm512_storeu_si512(b_tail[v] + q * 64, _mm512_loadu_si512(b + (k_full / 4 + q) * ldb + (v0 + v) * 64));
        const void *ap[2] = {a_tail[0], a_tail[1]};
        const void *bp[4] = {b_tail[0], b_tail[1], b_tail[2], b_tail[3]};
        amx_step(sa, rb, cb, ap, AMX_K, bp, 64);
      }
      char *const cv[2] = {(char *)(cr[0] + v0 * 16), (char *)(cr[1] + v0 * 16)};
      effc_amx_store(rb, cb, cv, ldc * 4, n, n, cols - v0 * 16);
    }
  }
  effc_amx_end(&state);
}

/* ---- AVX-512 VNNI (vpdpbusd): the same tile in R x V-vector register tiles ---- */
#define MAX_ROWS 6
#define MAX_VECS 4

/* acc += quad Q of R rows of a (its first BYTES bytes, the rest 0) x quad Q of V vectors of b */
#define VNNI_STEP(Q, BYTES)                                                                     \
  do {                                                                                          \
    __m512i bv[MAX_VECS];                                                                       \
    for (int v = 0; v < V; ++v) bv[v] = _mm512_loadu_si512(b + (Q) * ldb + v * 64);            \
    for (int r = 0; r < R; ++r) {                                                               \
      int32_t quad = 0;                                                                         \
      memcpy(&quad, a + r * lda + 4 * (Q), (BYTES));                                            \
      __m512i av = _mm512_set1_epi32(quad);                                                     \
      for (int v = 0; v < V; ++v)                                                               \
        acc[r][v] = sa ? _mm512_dpbusd_epi32(acc[r][v], bv[v], av) : _mm512_dpbusd_epi32(acc[r][v], av, bv[v]); \
    }                                                                                           \
  } while (0)

/* c[R, 16 V] from R rows of a and V vectors of the panel; vpdpbusd's first operand is the unsigned
   one: the broadcast quad of a (u8 a) or b's vector (u8 b, sa) */
static inline __attribute__((always_inline)) void vnni_block(const int sa, int32_t *c, int64_t ldc, const uint8_t *a,
                                                             int64_t lda, const uint8_t *b, int64_t ldb, int64_t k,
                                                             const int R, const int V, int cols) {
  __m512i acc[MAX_ROWS][MAX_VECS];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_si512();
  for (int64_t q = 0; q < k / 4; ++q) VNNI_STEP(q, 4);
  if (k % 4) VNNI_STEP(k / 4, k % 4); /* a's last quad holds fewer than 4 of its bytes: no read past them */
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_mask_storeu_epi32(c + r * ldc + v * 16, effc_lane_mask(cols - v * 16), acc[r][v]);
}

#define CASE(R, V) case (R) * 8 + (V): vnni_block(sa, c, ldc, a, lda, b, ldb, k, R, V, cols); return;
#define ROWS(R) CASE(R, 1) CASE(R, 2) CASE(R, 3) CASE(R, 4)
static void vnni_part(int sa, int32_t *c, int64_t ldc, const uint8_t *a, int64_t lda, const uint8_t *b, int64_t ldb,
                      int64_t k, int rows, int vecs, int cols) {
  if (sa) {
    switch (rows * 8 + vecs) { ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) }
  } else {
    switch (rows * 8 + vecs) { ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) }
  }
}

static void vnni_tile(int sa, int32_t *c, int64_t ldc, const uint8_t *a, int64_t lda, const uint8_t *b, int64_t ldb,
                      int64_t k, int rows, int blocks, int cols) {
  for (int v0 = 0; v0 < blocks; v0 += MAX_VECS) {
    int vecs = blocks - v0 < MAX_VECS ? blocks - v0 : MAX_VECS;
    for (int r0 = 0; r0 < rows; r0 += MAX_ROWS) {
      int part = rows - r0 < MAX_ROWS ? rows - r0 : MAX_ROWS;
      vnni_part(sa, c + r0 * ldc + v0 * 16, ldc, a + r0 * lda, lda, b + v0 * 64, ldb, k, part, vecs, cols - v0 * 16);
    }
  }
}

/* Addresses: c, c one row down; a, a one row down; b (the panel's first quad), b one quad on. The
   tile is mr x nr (nr a multiple of 16) over k bytes of a's rows; of it, rows x
   cols are computed (the rest of c is left as it was: the caller discards it, and nothing is stored
   past a row's cols). a_signed: s8 a x u8 b, else u8 a x s8 b. 0, or -1 for arguments out of range. */
int32_t effc_int8_tile(int32_t *c, int32_t *c_row, const uint8_t *a, const uint8_t *a_row, const uint8_t *b,
                       const uint8_t *b_quad, int64_t k, int32_t mr, int32_t nr, int32_t rows, int32_t cols,
                       int32_t a_signed) {
  int64_t ldc = c_row - c, lda = a_row - a, ldb = b_quad - b;
  if (rows > mr || cols > nr || nr % 16 || ldb < 4 * (int64_t)nr) return -1;
  if (rows <= 0 || cols <= 0 || k <= 0) {
    for (int r = 0; r < rows; ++r) memset(c + r * ldc, 0, (cols > 0 ? cols : 0) * sizeof(int32_t));
    return 0;
  }
  int blocks = (cols + 15) / 16;
  if (effc_amx() & EFFC_AMX_INT8) {
    if (a_signed) amx_tile(1, c, ldc, a, lda, b, ldb, k, rows, blocks, cols);
    else amx_tile(0, c, ldc, a, lda, b, ldb, k, rows, blocks, cols);
  } else {
    vnni_tile(a_signed != 0, c, ldc, a, lda, b, ldb, k, rows, blocks, cols);
  }
  return 0;
}

/* 1 when this process's tiles run on AMX (amx.h), else 0: for tests and `effc bench`'s notes. */
int32_t effc_int8_tile_amx(void) { return (effc_amx() & EFFC_AMX_INT8) != 0; }
