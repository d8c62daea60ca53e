/* One helper the C kernels share: which lanes of a 16-float vector lie inside a row. */
#ifndef EFFC_LANES_H
#define EFFC_LANES_H

#include <immintrin.h>
#include <stdint.h>

/* The lanes of a 16-lane vector when `left` elements of its row remain: rows may end mid-vector
   (TVM sizes a tile's buffer to the matrix; a key row of 197), so nothing past them is read or stored. */
static inline __attribute__((always_inline)) __mmask16 effc_lane_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1u) : (__mmask16)0;
}

#endif
