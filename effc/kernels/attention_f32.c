/* Fused fp32 attention for AVX-512: O = softmax(mask(Q K^T * scale + bias)) V, one query-row block at a
 * time, so the scores never leave the cache (the unfused form writes the [S, S] scores, reads them
 * back for the softmax, writes the probabilities and reads them again for the second product).
 *
 * Operands are strided views (element strides; the last axis contiguous): Q [b, h, i, d], K^T
 * [b, h, d, j] (the row-major transposed keys the graph computes anyway), V [b, h, j, c], an
 * optional bias [b, h, i, j] (a stride 0 broadcasts an axis: masks are [B, 1, 1, S] or [1, 1, S, S]),
 * an optional bool mask of the same form with a fill value (masked_fill: where the mask is
 * ``mask_fills``, the score becomes ``fill``) and O [b, h, i, c]: the head split / merge permutes
 * of the graph are read and written in place.
 *
 * Both products are one register tile: up to MR rows x 64 columns (4 vectors) of C += A B, A read
 * by broadcasts, B by rows; a ragged block's missing rows repeat its last row (computed, not
 * stored), ragged columns are masked loads and stores. The exponent is a Cody-Waite reduction with
 * a degree-6 polynomial and vscalefps, so rows match the unfused softmax closely.
 * A row whose scores are all -inf gives NaN, as the unfused softmax does.
 */
#include <immintrin.h>
#include <stdint.h>

#include "lanes.h"

#define MR 6
#define NV 4
#define LANES 16
#define TILE_COLS (NV * LANES)
#define KC 64 /* keys per P V chunk: 64 rows of V (D_v 64) are 16 KiB */

/* c[r][0:n] = ((accumulate ? c[r][0:n] : 0) + sum_k a[r][k] b[k][0:n]) * row_scale[r] for
 * r < rows <= MR and 16 (nv - 1) < n <= 16 nv: nv is a constant in each call site's copy, so the
 * accumulators stay in registers and only the last vector is masked */
static inline __attribute__((always_inline)) void tile_nv(const int nv, const float *a, int64_t lda, int rows,
                                                          const float *b, int64_t ldb, int64_t k, int64_t n,
                                                          float *c, int64_t ldc, const float *row_scale,
                                                          int accumulate) {
    const float *ar[MR];
    __m512 acc[MR][NV];
    const __mmask16 last = effc_lane_mask(n - (nv - 1) * LANES);
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) ar[r] = a + (r < rows ? r : rows - 1) * lda;
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 8
        for (int v = 0; v < nv; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < k; kk++) {
        const float *bk = b + kk * ldb;
        __m512 bv[NV];
#pragma GCC unroll 8
        for (int v = 0; v < nv - 1; v++) bv[v] = _mm512_loadu_ps(bk + v * LANES);
        bv[nv - 1] = _mm512_maskz_loadu_ps(last, bk + (nv - 1) * LANES);
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
            __m512 av = _mm512_set1_ps(ar[r][kk]);
#pragma GCC unroll 8
            for (int v = 0; v < nv; v++) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) {
        if (r >= rows) break;
        __m512 s = _mm512_set1_ps(row_scale[r]);
        float *cr = c + r * ldc;
        if (accumulate) {
#pragma GCC unroll 8
            for (int v = 0; v < nv - 1; v++) acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_loadu_ps(cr + v * LANES));
            acc[r][nv - 1] = _mm512_add_ps(acc[r][nv - 1], _mm512_maskz_loadu_ps(last, cr + (nv - 1) * LANES));
        }
#pragma GCC unroll 8
        for (int v = 0; v < nv - 1; v++) _mm512_storeu_ps(cr + v * LANES, _mm512_mul_ps(acc[r][v], s));
        _mm512_mask_storeu_ps(cr + (nv - 1) * LANES, last, _mm512_mul_ps(acc[r][nv - 1], s));
    }
}

/* c[:rows, 0:n] (+)= a[:rows, :k] b[:k, 0:n], rows scaled: for any n, in tiles of 64 columns, the
 * last one only as wide as it needs */
static void product(const float *a, int64_t lda, int rows, const float *b, int64_t ldb, int64_t k, int64_t n,
                    float *c, int64_t ldc, const float *row_scale, int accumulate) {
    for (int64_t j = 0; j < n; j += TILE_COLS) {
        const int64_t left = n - j;
        switch (left > TILE_COLS ? NV : (int)((left + LANES - 1) / LANES)) {
            case 1: tile_nv(1, a, lda, rows, b + j, ldb, k, left, c + j, ldc, row_scale, accumulate); break;
            case 2: tile_nv(2, a, lda, rows, b + j, ldb, k, left, c + j, ldc, row_scale, accumulate); break;
            case 3: tile_nv(3, a, lda, rows, b + j, ldb, k, left, c + j, ldc, row_scale, accumulate); break;
            default: tile_nv(4, a, lda, rows, b + j, ldb, k, left, c + j, ldc, row_scale, accumulate); break;
        }
    }
}

/* e^x for x <= 0 (the softmax's shifted scores), relative error ~2e-7; NaN stays NaN. Below -87.3,
 * e^x is no normal float: such weights are 0, as a denormal would make every product that reads it
 * take a microcode assist (a masked key's -1e4 or -inf lands here). */
static inline __attribute__((always_inline)) __m512 exp_nonpositive(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693145751953125f), ln2_lo = _mm512_set1_ps(1.428606765330187e-06f);
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_lo, _mm512_fnmadd_ps(n, ln2_hi, x)); /* |r| <= ln2 / 2 */
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_mask_mov_ps(_mm512_scalef_ps(p, n), underflow, _mm512_setzero_ps());
}

/* Where a row's scores take the fill: the lanes whose mask byte is (non-zero) == fills; a ragged
 * tail's bytes are copied, not over-read (AVX-512F has no masked byte load) */
static inline __attribute__((always_inline)) __mmask16 filled(const uint8_t *mask, __mmask16 m, int fills) {
    __m128i raw;
    if (m == 0xFFFF) {
        raw = _mm_loadu_si128((const __m128i *)mask);
    } else {
        uint8_t tail[LANES] = {0};
        for (int i = 0; i < LANES && (m >> i & 1); i++) tail[i] = mask[i];
        raw = _mm_loadu_si128((const __m128i *)tail);
    }
    __m512i bytes = _mm512_cvtepu8_epi32(raw);
    __mmask16 set = _mm512_test_epi32_mask(bytes, bytes);
    return (fills ? set : (__mmask16)~set) & m;
}

/* s[0:n] = e^(x - max) in place for x = s (already scaled) + bias, filled where the mask says;
 * returns 1 / their sum */
static float softmax_row(float *s, const float *bias, const uint8_t *mask, int fills, float fill, int64_t n) {
    __m512 vmax = _mm512_set1_ps(-__builtin_inff());
    const __m512 vfill = _mm512_set1_ps(fill);
    for (int64_t j = 0; j < n; j += LANES) {
        __mmask16 m = effc_lane_mask(n - j);
        __m512 x = _mm512_maskz_loadu_ps(m, s + j);
        if (bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, bias + j));
        if (mask) x = _mm512_mask_mov_ps(x, filled(mask + j, m, fills), vfill);
        if (bias || mask) _mm512_mask_storeu_ps(s + j, m, x);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, x);
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += LANES) {
        __mmask16 m = effc_lane_mask(n - j);
        __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), top)));
        _mm512_mask_storeu_ps(s + j, m, e);
        sum = _mm512_add_ps(sum, e);
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

/* out[c] = column c of the 16 x 16 block in r[0..15]: 32-bit, then 64-bit interleaves, then two
 * rounds of 128-bit lane shuffles */
static inline __attribute__((always_inline)) void transpose16(const __m512 r[16], __m512 out[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 4; g++) { /* u[4g + m]: rows 4g..4g+3 of column 4L + m in lane L */
        __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 2]);
        __m512d c = _mm512_castps_pd(t[4 * g + 1]), d = _mm512_castps_pd(t[4 * g + 3]);
        u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    for (int m = 0; m < 4; m++) {
        __m512 v0 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44), v1 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xEE);
        __m512 w0 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44);
        __m512 w1 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xEE);
        out[m] = _mm512_shuffle_f32x4(v0, w0, 0x88);
        out[4 + m] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
        out[8 + m] = _mm512_shuffle_f32x4(v1, w1, 0x88);
        out[12 + m] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
    }
}

/* K^T's rows for the products: K [j, d] (strides kj, kd: the linear's output read through the head
 * split) copied transposed into kt_rows [d, lds], in 16 x 16 register blocks where d is contiguous */
static void transpose_keys(const float *k, int64_t kd, int64_t kj, int64_t sk, int64_t d, float *kt_rows,
                           int64_t lds) {
    const int64_t d_blocks = kd == 1 ? d / LANES * LANES : 0, j_blocks = sk / LANES * LANES;
    for (int64_t j0 = 0; j0 < j_blocks; j0 += LANES)
        for (int64_t d0 = 0; d0 < d_blocks; d0 += LANES) {
            __m512 r[LANES], out[LANES];
            for (int i = 0; i < LANES; i++) r[i] = _mm512_loadu_ps(k + (j0 + i) * kj + d0);
            transpose16(r, out);
            for (int c = 0; c < LANES; c++) _mm512_storeu_ps(kt_rows + (d0 + c) * lds + j0, out[c]);
        }
    for (int64_t dd = 0; dd < d; dd++) { /* what the blocks left: ragged keys, ragged or strided d */
        float *row = kt_rows + dd * lds;
        for (int64_t j = dd < d_blocks ? j_blocks : 0; j < sk; j++) row[j] = k[j * kj + dd * kd];
    }
}

/* One task: rows [i0, i0 + task_rows) of head h of batch b; strides are in elements. K^T is read
 * in place where its rows are contiguous (kj == 1), else transposed per task. ``scratch`` holds
 * the task's rows of scores, each rounded up to whole vectors, a float per row and, where K^T is
 * transposed, its d rows: (task_rows + (kj != 1) d) * 16 ceil(sk / 16) + task_rows floats.
 * ``mask_fills``: -1 no mask, 1 fill where it is true, 0 where it is false. */
int32_t effc_attention_f32(const float *q, const float *kt, const float *v, const float *bias,
                           const uint8_t *mask, float *o, float *scratch, int32_t heads, int32_t sq,
                           int32_t sk, int32_t d, int32_t dv, float scale, int64_t qb, int64_t qh,
                           int64_t qi, int64_t kb, int64_t kh, int64_t kd, int64_t kj,
                           int64_t vb, int64_t vh, int64_t vj, int64_t bb, int64_t bh, int64_t bi, int64_t ob,
                           int64_t oh, int64_t oi, int64_t mb, int64_t mh, int64_t mi, int32_t has_bias,
                           int32_t mask_fills, float fill, int32_t task, int32_t task_rows) {
    const int32_t chunks = (sq + task_rows - 1) / task_rows;
    const int32_t b = task / (heads * chunks), h = task / chunks % heads;
    const int32_t i_start = task % chunks * task_rows;
    const int32_t i_end = i_start + task_rows < sq ? i_start + task_rows : sq;
    const int64_t lds = ((int64_t)sk + LANES - 1) / LANES * LANES;
    float *scores = scratch;
    q += b * qb + h * qh;
    kt += b * kb + h * kh;
    v += b * vb + h * vh;
    o += b * ob + h * oh;
    if (has_bias) bias += b * bb + h * bh;
    if (mask_fills >= 0) mask += b * mb + h * mh;
    float *inv_sum = scores + (int64_t)task_rows * lds; /* one per row, after the scores */
    if (kj != 1) {
        float *kt_rows = inv_sum + task_rows;
        transpose_keys(kt, kd, kj, sk, d, kt_rows, lds);
        kt = kt_rows, kd = lds;
    }
    float scales[MR], ones[MR];
    for (int r = 0; r < MR; r++) scales[r] = scale, ones[r] = 1.0f;
    /* Q K^T a panel of 64 keys at a time for all the task's rows: the panel of K^T (D x 64) stays
     * in L1 while the row blocks pass */
    for (int64_t j = 0; j < sk; j += TILE_COLS) {
        const int64_t n = sk - j < TILE_COLS ? sk - j : TILE_COLS;
        for (int32_t i0 = i_start; i0 < i_end; i0 += MR) {
            const int rows = i_end - i0 < MR ? i_end - i0 : MR;
            product(q + i0 * qi, qi, rows, kt + j, kd, d, n, scores + (i0 - i_start) * lds + j, lds, scales, 0);
        }
    }
    for (int32_t i = i_start; i < i_end; i++)
        inv_sum[i - i_start] = softmax_row(scores + (i - i_start) * lds, has_bias ? bias + i * bi : 0,
                                               mask_fills >= 0 ? mask + i * mi : 0, mask_fills, fill, sk);
    /* P V over chunks of KC keys (KC rows of V stay in L1), summed in O; the last chunk scales */
    for (int64_t j = 0; j < sk; j += KC) {
        const int64_t k = sk - j < KC ? sk - j : KC;
        const int last = j + KC >= sk;
        for (int32_t i0 = i_start; i0 < i_end; i0 += MR) {
            const int rows = i_end - i0 < MR ? i_end - i0 : MR;
            product(scores + (i0 - i_start) * lds + j, lds, rows, v + j * vj, vj, k, dv, o + i0 * oi, oi,
                    last ? inv_sum + (i0 - i_start) : ones, j > 0);
        }
    }
    return 0;
}
