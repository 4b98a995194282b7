#include "ops/cuda/attention.h"

#include <algorithm>
#include <cmath>

#include "core/cuda/device.h"
#include "core/rng.h"
#include "ops/cuda/kernel_utils.cuh"
#include "ops/cuda/wgmma.cuh"

namespace mhc::cuda {
namespace {

using detail::exp2_fast;
using detail::ldmatrix;
using detail::mma_bf16;
using detail::pack_bf16;

// A block's warps own kWarpRows rows each (kOwnRows queries, or keys in dK/dV), as
// kMTiles m16 tiles: every B fragment read from shared memory feeds kMTiles products,
// which halves the shared-memory reads per product against one tile a warp (those reads,
// not the tensor cores, bounded the kernels). The other side streams through shared
// memory in tiles of 64 rows. A tile row is D bf16 plus 8 of padding, so that the 8 rows
// an ldmatrix reads fall in distinct banks.
constexpr int kBlock = 64, kMTiles = 2, kWarpRows = 16 * kMTiles, kWarps = 4, kThreads = 32 * kWarps,
              kOwnRows = kWarpRows * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
template <int D> constexpr int kStride = D + 8;
template <int D> constexpr int kTileElems = kBlock * kStride<D>;

// Starts copying rows [row0, row0 + ROWS) of a matrix (row stride ld, D columns from
// `base`) into a tile (cp.async), zeros past `rows`; the caller commits and waits.
// Each thread copies 16 bytes of every kThreads / (D / 8)-th row, unrolled: the copies sit
// in the kernels' main loops, where index arithmetic would cost as much as the math.
template <int D, int ROWS = kBlock>
__device__ void load_tile(const bf16* base, int64_t ld, int64_t row0, int64_t rows, bf16* tile) {
  constexpr int kPerRow = D / 8, kRowStep = kThreads / kPerRow, kSteps = (ROWS + kRowStep - 1) / kRowStep;
  static_assert(kThreads % kPerRow == 0, "whole rows per pass");
  const int r = static_cast<int>(threadIdx.x) / kPerRow, c = static_cast<int>(threadIdx.x) % kPerRow * 8;
#pragma unroll
  for (int i = 0; i < kSteps; ++i) {
    const int tile_row = r + i * kRowStep;
    if (ROWS % kRowStep != 0 && tile_row >= ROWS) break;
    const int64_t row = row0 + tile_row;
    const bool valid = row < rows;
    detail::copy_async<16>(tile + tile_row * kStride<D> + c, base + (valid ? row : 0) * ld + c, valid);
  }
}

// A fragment: rows [r0, r0 + 16), columns [16 ks, 16 ks + 16) of a row-major tile.
template <int D> __device__ void load_a(const bf16* tile, int r0, int ks, uint32_t (&a)[4]) {
  const int lane = threadIdx.x % 32;
  ldmatrix<4, false>(a, tile + (r0 + lane % 8 + (lane / 8) % 2 * 8) * kStride<D> + ks * 16 + lane / 16 * 8);
}
// B fragments of two n8 tiles (b[0..1]: columns n0.., b[2..3]: n0 + 8..), k rows
// [16 ks, 16 ks + 16), from a tile stored [n][k] (B^T row-major, e.g. K for q k^T).
template <int D> __device__ void load_b_nk(const bf16* tile, int n0, int ks, uint32_t (&b)[4]) {
  const int lane = threadIdx.x % 32;
  ldmatrix<4, false>(b, tile + (n0 + lane % 8 + lane / 16 * 8) * kStride<D> + ks * 16 + (lane / 8) % 2 * 8);
}
// The same from a tile stored [k][n] (B row-major, e.g. V for P v).
template <int D> __device__ void load_b_kn(const bf16* tile, int ks, int n0, uint32_t (&b)[4]) {
  const int lane = threadIdx.x % 32;
  ldmatrix<4, true>(b, tile + (ks * 16 + lane % 8 + (lane / 8) % 2 * 8) * kStride<D> + n0 + lane / 16 * 8);
}
// Column of accumulator element e of n8 tile j (C layout) within its block of columns.
__device__ inline int accumulator_column(int j, int e) { return j * 8 + 2 * static_cast<int>(threadIdx.x % 4) + e % 2; }

// The lane's two accumulator rows (g and g + 8) of each of the warp's m-tiles, from the
// warp's first row.
struct WarpRows {
  int row[kMTiles][2];
};
__device__ inline WarpRows warp_rows(int first) {
  const int g = static_cast<int>(threadIdx.x % 32) / 4;
  WarpRows w;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) w.row[mt][0] = first + 16 * mt + g, w.row[mt][1] = first + 16 * mt + g + 8;
  return w;
}

// Sets the scores of keys a query may not see (later keys, keys past T) to `hidden`.
// Accumulator tiles of a [query][key] block (TRANSPOSED: [key][query]): row r is this
// lane's row own[r], column u0 + accumulator_column.
template <bool TRANSPOSED, int NT>
__device__ inline void mask_scores(float (&p)[NT][4], const int (&own)[2], int u0, int T, float hidden) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int mine = own[e / 2], other = u0 + accumulator_column(j, e);
      const int t = TRANSPOSED ? other : mine, u = TRANSPOSED ? mine : other;
      if (u > t || u >= T) p[j][e] = hidden;
    }
}

// The A fragment of k step ks from accumulator tiles [16 rows][8 j + ...] (C layout).
template <int NT> __device__ inline void accumulators_as_a(const float (&c)[NT][4], int ks, uint32_t (&a)[4]) {
  a[0] = pack_bf16(c[2 * ks][0], c[2 * ks][1]);
  a[1] = pack_bf16(c[2 * ks][2], c[2 * ks][3]);
  a[2] = pack_bf16(c[2 * ks + 1][0], c[2 * ks + 1][1]);
  a[3] = pack_bf16(c[2 * ks + 1][2], c[2 * ks + 1][3]);
}

// acc [m-tile][NT n8 tiles] = A times the tile stored [n][k] (NT * 8 rows), over D / 16 k
// steps; a_fragment(mt, ks, a) gives A's fragments (from registers or shared memory).
template <int D, int NT, typename AFragment>
__device__ void product_nk(AFragment a_fragment, const bf16* tile, float (&acc)[kMTiles][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) a_fragment(mt, ks, a[mt]);
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t b[4];
      load_b_nk<D>(tile, j * 8, ks, b);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma_bf16(acc[mt][j], a[mt], b[0], b[1]);
        mma_bf16(acc[mt][j + 1], a[mt], b[2], b[3]);
      }
    }
  }
}
// A in registers: fragments[mt][ks].
template <int D> struct RegisterA {
  const uint32_t (&fragments)[kMTiles][D / 16][4];
  __device__ void operator()(int mt, int ks, uint32_t (&a)[4]) const {
#pragma unroll
    for (int k = 0; k < 4; ++k) a[k] = fragments[mt][ks][k];
  }
};
// A in shared memory: the warp's rows [r0 + 16 mt, ..) of a row-major tile.
template <int D> struct SharedA {
  const bf16* tile;
  int r0;
  __device__ void operator()(int mt, int ks, uint32_t (&a)[4]) const { load_a<D>(tile, r0 + 16 * mt, ks, a); }
};

// acc [m-tile][D] += (accumulator tiles as A, KS k steps of 16 columns) times the tile
// stored [k][n].
template <int D, int KS>
__device__ void accumulate_kn(const float (&p)[kMTiles][2 * KS][4], const bf16* tile, float (&acc)[kMTiles][D / 8][4]) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) accumulators_as_a(p[mt], ks, a[mt]);
#pragma unroll
    for (int dt = 0; dt < D / 8; dt += 2) {
      uint32_t b[4];
      load_b_kn<D>(tile, ks, dt * 8, b);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma_bf16(acc[mt][dt], a[mt], b[0], b[1]);
        mma_bf16(acc[mt][dt + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// Starts copying key tile kb's k and v (this head's columns of the qkv rows at `base`).
template <int D>
__device__ void load_kv(const bf16* base, int64_t row, int64_t C, int64_t kb, int64_t T, bf16* k_tile, bf16* v_tile) {
  load_tile<D>(base + C, row, kb * kBlock, T, k_tile);
  load_tile<D>(base + 2 * C, row, kb * kBlock, T, v_tile);
}

// Stores this lane's part of one accumulator row (C layout: half hh is row g or g + 8 of
// the m-tile; the lane has columns 8 dt + 2 q4 and + 1) times f as bf16 from `out`.
template <int D>
__device__ inline void store_row(const float (&acc)[D / 8][4], int hh, float f, bf16* out) {
  const int q4 = static_cast<int>(threadIdx.x % 4);
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
    *reinterpret_cast<uint32_t*>(out + dt * 8 + 2 * q4) = pack_bf16(acc[dt][2 * hh] * f, acc[dt][2 * hh + 1] * f);
}

// Stores this lane's accumulator rows (the sequence positions in `rows`) as bf16: position
// t's row at destination(t) times factor(mt, hh); positions past T are skipped.
template <int D, typename Destination, typename Factor>
__device__ void store_rows(const float (&acc)[kMTiles][D / 8][4], const WarpRows& rows, int64_t T,
                           Destination destination, Factor factor) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
      if (rows.row[mt][hh] < T)
        store_row<D>(acc[mt], hh, factor(mt, hh), destination(static_cast<int64_t>(rows.row[mt][hh])));
}

struct Head {
  int64_t T, C, H, b, h, bh;
};
// Grid (batch x heads, row blocks): every head's blocks of one weight launch together,
// the heaviest first (see own_rows), so the light ones fill the tail.
__device__ inline Head head_of(int64_t T, int64_t C, int64_t H) {
  const int64_t bh = blockIdx.x;
  return {T, C, H, bh / H, bh % H, bh};
}
// The block's first own row. Causal work grows with the query and shrinks with the key:
// query blocks (LATER_FIRST) are taken from the end of the sequence, key blocks from the
// start.
template <bool LATER_FIRST> __device__ inline int64_t own_rows() {
  const int64_t block = LATER_FIRST ? gridDim.y - 1 - blockIdx.y : blockIdx.y;
  return block * kOwnRows;
}
// The last key tile that a query block's kOwnRows queries from t0 see (causal; none past T).
__device__ inline int last_key_tile(int64_t t0, int64_t T) {
  return static_cast<int>(((t0 + kOwnRows < T ? t0 + kOwnRows : T) - 1) / kBlock);
}
// A kernel's dropout: the key read where it runs (Philox) into `dropout`; returns the kept
// values' scale.
template <detail::Drop DROP>
__device__ inline float start_dropout(cpu::DropoutSpec& dropout) {
  if constexpr (DROP == detail::Drop::kPhilox) dropout.key = detail::dropout_key(dropout);
  return dropout_kept_scale<float>(dropout.p);
}
// The attention dropout mask's element of query t and key u of sequence-and-head bh: its
// index in the layer's Philox stream (the CPU reference's numbering).
__device__ inline uint64_t mask_element(int64_t bh, int64_t T, int64_t t, int64_t u) {
  return static_cast<uint64_t>((bh * T + t) * T + u);
}
__device__ inline float drop(const Head& s, cpu::DropoutSpec dropout, int64_t t, int64_t u) {
  return dropout_scale<float>(dropout.key, mask_element(s.bh, s.T, t, u), dropout.p);
}
// Dropout's keep bits (bit e: element e kept) of this lane's four elements of an
// accumulator tile (rows g, g + 8 at positions row0, row1; columns 2 tig, 2 tig + 1 from
// position col0), the mask element of query t and key u being mask_element(bh, T, t, u).
// QUERY_ROWS: the forward's and dQ's [query][key] tiles, else dK/dV's [key][query] ones.
// A Philox call gives four consecutive keys of a query, so where T % 4 == 0 the lanes
// sharing calls make one each and exchange the bits: the lane pairs (tig, tig ^ 1) of a
// query's keys, or the quads of lanes (g = 4a..4a + 3, same tig) of four keys' rows. The
// same masks as drop() element by element (its path where T % 4 != 0).
template <bool QUERY_ROWS>
__device__ uint32_t keep_bits(const Head& s, const cpu::DropoutSpec& d, int64_t row0, int64_t row1, int64_t col0) {
  auto index = [&](int64_t t, int64_t u) { return mask_element(s.bh, s.T, t, u); };
  auto bits_of = [&](uint64_t first) { return dropout_keep_bits4(d.key, first, d.p); };
  const int lane = static_cast<int>(threadIdx.x % 32), tig = lane % 4, r = lane / 4 % 4;
  if (s.T % 4 != 0) {
    uint32_t bits = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t row = e < 2 ? row0 : row1, col = col0 + e % 2;
      const float keep = QUERY_ROWS ? drop(s, d, row, col) : drop(s, d, col, row);
      bits |= static_cast<uint32_t>(keep != 0.0f) << e;
    }
    return bits;
  }
  if constexpr (QUERY_ROWS) {
    // the even lane makes row g's group of four keys, the odd one row g + 8's
    const bool odd = tig % 2;
    const uint32_t mine = bits_of(index(odd ? row1 : row0, col0 - (odd ? 2 : 0)));
    const uint32_t other = __shfl_xor_sync(0xffffffffu, mine, 1);
    return odd ? ((other >> 2) & 3u) | (mine & 12u) : (mine & 3u) | ((other & 3u) << 2);
  } else {
    // lane r of a quad makes the group of element r (row r / 2, column r % 2): its row's
    // four keys from 4a; element e's bit is then bit r of quad lane e's group
    const uint32_t mine = bits_of(index(col0 + r % 2, (r / 2 ? row1 : row0) - r));
    uint32_t bits = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) bits |= (__shfl_sync(0xffffffffu, mine, (lane & ~12) | (e << 2)) >> r & 1u) << e;
    return bits;
  }
}

using detail::Drop;  // the Philox stream: keep_bits; bits: KeepMask

// Attention dropout's keep mask as bits, a 32-bit word per query and 32 keys: bit k of word
// (bh T + t) per_row + w is element (t, 32 w + k). keep_mask_kernel writes the words w <=
// t / 32 of each query t, the causal ones (with those keys' bits past the diagonal); the
// kernels read no other: a warp's 32 queries (or keys) are 32-aligned.
template <typename Word>
struct KeepMask {  // Word: uint32_t (the forward), const uint32_t
  Word* words;
  int64_t per_row;  // (T + 31) / 32
  __device__ Word* word(int64_t bh, int64_t T, int64_t t, int64_t u0) const {
    return words + (bh * T + t) * per_row + u0 / 32;
  }
  __device__ Word* word(const Head& s, int64_t t, int64_t u0) const { return word(s.bh, s.T, t, u0); }
};

// The keep bits (keep_bits' layout) of this lane's n8 tiles j of a [query][key] half, its
// rows `rows`, from key u0 (the forward's and dQ's): with kept bits from the mask words of
// its two rows (bits 8 j + 2 tig, + 1 of each: its columns), else from the Philox stream.
template <Drop DROP> struct QueryHalfMask {
  uint32_t words[2] = {0, 0};
  __device__ QueryHalfMask(const Head& s, const KeepMask<const uint32_t>& mask, const int (&rows)[2], int64_t u0) {
    if constexpr (DROP == Drop::kBits)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
        if (rows[hh] < s.T) words[hh] = *mask.word(s, rows[hh], u0);
  }
  __device__ uint32_t bits(const Head& s, const cpu::DropoutSpec& d, const int (&rows)[2], int64_t u0, int j) const {
    if constexpr (DROP == Drop::kBits) {
      const int shift = 8 * j + 2 * static_cast<int>(threadIdx.x % 4);
      return (words[0] >> shift & 3u) | (words[1] >> shift & 3u) << 2;
    } else {
      return keep_bits<true>(s, d, rows[0], rows[1], u0 + accumulator_column(j, 0));
    }
  }
};

// Which elements of a [key][query] tile of P^T of TILES n8 tiles (from query t0; dK/dV's)
// dropout keeps, for a warp's keys from `first` and the lane's rows `keys`: bit 4 j + e for
// its accumulator (j, e). Kept bits: each lane brings the mask words of queries t0 + 32 h +
// lane for the 32 keys from first's 32-aligned start (queries before them have no word:
// their elements are masked), and the lanes take their columns' words by shuffle.
template <Drop DROP, int TILES>
__device__ inline uint32_t kept_transposed(const Head& s, const cpu::DropoutSpec& dropout,
                                           const KeepMask<const uint32_t>& mask, const int (&keys)[2], int first,
                                           int t0) {
  static_assert(TILES * 4 <= 32, "the bits in one word");
  uint32_t kept = 0;
  if constexpr (DROP == Drop::kBits) {
    const int key_base = first & ~31, lane = static_cast<int>(threadIdx.x % 32);
    uint32_t words[(TILES * 8 + 31) / 32];
#pragma unroll
    for (int h = 0; h < (TILES * 8 + 31) / 32; ++h) {
      const int64_t t = t0 + 32 * h + lane;
      words[h] = t < s.T && t >= key_base ? *mask.word(s, t, key_base) : 0u;
    }
#pragma unroll
    for (int j = 0; j < TILES; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t word = __shfl_sync(0xffffffffu, words[j / 4], accumulator_column(j, e) % 32);
        kept |= (word >> (keys[e / 2] - key_base) & 1u) << (4 * j + e);
      }
  } else {
#pragma unroll
    for (int j = 0; j < TILES; ++j)
      kept |= keep_bits<false>(s, dropout, keys[0], keys[1], t0 + accumulator_column(j, 0)) << (4 * j);
  }
  return kept;
}

// The mask words of every (batch x head, query t, w <= t / 32): a thread a word, from the
// Philox stream of the forward's elements (drop(): four values a call where T % 4 == 0,
// dropout_keep_bits4, else one). A block (x) is a head's 32-query band b, whose b + 1
// words a query are numbered row by row (threads past them leave as whole warps: a warp
// of 32 words a query, half of whose lanes had no word, spent twice the time).
__global__ void keep_mask_kernel(int64_t T, cpu::DropoutSpec dropout, KeepMask<uint32_t> mask) {
  const int bands = static_cast<int>(mask.per_row), band = static_cast<int>(blockIdx.x % bands);
  const int64_t bh = blockIdx.x / bands;
  const int i = static_cast<int>(blockIdx.y * blockDim.x + threadIdx.x), per_query = band + 1;
  if (i >= 32 * per_query) return;
  const int64_t t = 32 * band + i / per_query;
  const int w = i % per_query;
  if (t >= T) return;
  const uint64_t key = detail::dropout_key(dropout);
  const uint64_t first = mask_element(bh, T, t, 32 * w);
  uint32_t word = 0;
  if (T % 4 == 0) {
#pragma unroll
    for (int q = 0; q < 8; ++q) word |= dropout_keep_bits4(key, first + 4 * q, dropout.p) << (4 * q);
  } else {
    for (int k = 0; k < 32 && 32 * w + k < T; ++k)
      word |= static_cast<uint32_t>(dropout_scale<float>(key, first + k, dropout.p) != 0.0f) << k;
  }
  *mask.word(bh, T, t, 32 * w) = word;
}

// The streamed tiles are used 32 rows at a time (kHalf): score accumulators of a whole
// 64-row tile for two m-tiles would take 64 registers a set.
constexpr int kHalf = kBlock / 2, kHalfTiles = kHalf / 8;

// One m-tile's step of the online softmax over a tile of keys: p (NT n8 tiles of raw
// scores, masked to -inf) becomes P = exp2(p scale2 - m) with m the rows' running max in
// scaled log2 units; the rows' sums l (of P before dropout) and their out o are rescaled to
// the new max first. Key 0 precedes every query, so after the first tile every row's max is
// finite; before it m = -inf and the correction is exp2(-inf) = 0. (Rows whose queries all
// precede the tile have max -inf here: no change, P = 0.)
template <int NT, int DT>
__device__ inline void online_softmax(float (&p)[NT][4], float scale2, float (&m)[2], float (&l)[2], float (&o)[DT][4]) {
  float mx[2] = {p[0][0], p[0][2]};
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) mx[e / 2] = fmaxf(mx[e / 2], p[j][e]);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
    mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
    const float m_new = fmaxf(m[hh], mx[hh] * scale2);
    const float correction = exp2_fast(m[hh] - m_new);
    l[hh] *= correction;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[dt][2 * hh] *= correction, o[dt][2 * hh + 1] *= correction;
    m[hh] = m_new;
  }
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int hh = e / 2;
      const float pe = exp2_fast(fmaf(p[j][e], scale2, -m[hh]));
      l[hh] += pe;  // the normaliser is over P before dropout
      p[j][e] = pe;
    }
}

// Dropout on P (or dP) of a half (32 keys from u0, 4 n8 tiles) of one m-tile's rows. Rounded
// here, never fused into a later subtraction: the kernels' variants then give the same bits.
template <Drop DROP>
__device__ inline void drop_half(float (&p)[kHalf / 8][4], const Head& s, const KeepMask<const uint32_t>& mask,
                                 const cpu::DropoutSpec& dropout, const int (&rows)[2], int u0, float keep_scale) {
  const QueryHalfMask<DROP> half_mask(s, mask, rows, u0);
#pragma unroll
  for (int j = 0; j < kHalf / 8; ++j) {
    const uint32_t kept = half_mask.bits(s, dropout, rows, u0, j);
#pragma unroll
    for (int e = 0; e < 4; ++e) p[j][e] = __fmul_rn(p[j][e], kept >> e & 1u ? keep_scale : 0.0f);
  }
}

// The forward's end for one m-tile: the rows' lse (log2 units) and out = o / l as bf16.
template <int D>
__device__ inline void store_forward_rows(const float (&o)[D / 8][4], const float (&m)[2], float (&l)[2],
                                          const int (&rows)[2], const Head& s, bf16* out, float* lse) {
  const int q4 = static_cast<int>(threadIdx.x % 4);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int t = rows[hh];
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
    if (t >= s.T) continue;
    if (q4 == 0) lse[s.bh * s.T + t] = m[hh] + log2f(l[hh]);
    store_row<D>(o, hh, 1.0f / l[hh], out + (s.b * s.T + t) * s.C + s.h * D);
  }
}

// Forward: a block takes kOwnRows queries, the key tiles up to its last query. Held to 168
// registers (three blocks a multiprocessor; a few bytes spill outside the main loop).
template <int D, Drop DROP>
__global__ void __launch_bounds__(kThreads, 3)
    flash_forward_kernel(const bf16* qkv, int64_t T, int64_t C, int64_t H, float scale, cpu::DropoutSpec dropout,
                         KeepMask<const uint32_t> mask, bf16* out, float* lse) {
  constexpr bool DROPOUT = DROP != Drop::kOff;
  const float keep_scale = start_dropout<DROP>(dropout);
  // q, then two buffers of k and v: the next key tile is copied while this one is used.
  extern __shared__ __align__(16) bf16 shared[];
  bf16* q_tile = shared;
  auto k_tile = [&](int buffer) { return shared + kOwnRows * kStride<D> + buffer * kTileElems<D>; };
  auto v_tile = [&](int buffer) { return k_tile(2 + buffer); };
  const int warp = threadIdx.x / 32;
  const Head s = head_of(T, C, H);
  const int64_t row = 3 * C, t0 = own_rows<true>();
  const bf16* base = qkv + s.b * T * row + s.h * D;
  const float scale2 = scale * kLog2e;  // scores in log2 units: exp2 is the fast path
  load_tile<D, kOwnRows>(base, row, t0, T, q_tile);
  load_kv<D>(base, row, C, 0, T, k_tile(0), v_tile(0));
  detail::commit_async();
  uint32_t qa[kMTiles][D / 16][4];
  float o[kMTiles][D / 8][4] = {}, m[kMTiles][2], l[kMTiles][2] = {};
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) m[mt][0] = m[mt][1] = -INFINITY;
  const int first = static_cast<int>(t0) + warp * kWarpRows;  // this warp's first query
  const WarpRows tq = warp_rows(first);
  const int last_tile = last_key_tile(t0, T);
  for (int kb = 0; kb <= last_tile; ++kb) {
    const int buffer = kb & 1;
    if (kb < last_tile) load_kv<D>(base, row, C, kb + 1, T, k_tile(buffer ^ 1), v_tile(buffer ^ 1));
    detail::commit_async();
    detail::wait_async<1>();
    __syncthreads();
    if (kb == 0)
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) load_a<D>(q_tile, warp * kWarpRows + 16 * mt, ks, qa[mt][ks]);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int u0 = kb * kBlock + half * kHalf;
      if (u0 > first + kWarpRows - 1) continue;  // every key of the half is after this warp's queries
      const int offset = half * kHalf * kStride<D>;
      float p[kMTiles][kHalfTiles][4];
      product_nk<D, kHalfTiles>(RegisterA<D>{qa}, k_tile(buffer) + offset, p);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        // Only the half reaching these queries (or past T) needs the mask.
        if (u0 + kHalf - 1 > first + 16 * mt || u0 + kHalf > T)
          mask_scores<false>(p[mt], tq.row[mt], u0, static_cast<int>(T), -INFINITY);
        online_softmax(p[mt], scale2, m[mt], l[mt], o[mt]);
        if constexpr (DROPOUT) drop_half<DROP>(p[mt], s, mask, dropout, tq.row[mt], u0, keep_scale);
      }
      accumulate_kn<D, kHalfTiles / 2>(p, v_tile(buffer) + offset, o);
    }
    __syncthreads();  // this buffer is refilled next iteration
  }
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) store_forward_rows<D>(o[mt], m[mt], l[mt], tq.row[mt], s, out, lse);
}

// The forward on Hopper's warpgroup products (sm_90a, head dim 64): the same blocks of
// kOwnRows queries, as two warpgroups of 64 (a warp's 16 rows one m-tile), the key tiles of
// 64 whole: S = q k^T and out += P v are each four m64n64k16 wgmma (q, k and v read by the
// tensor cores from shared memory in the 128-byte swizzle; P from registers), so the
// fragments no longer go through the register file by ldmatrix (which bounded the
// mma.sync kernel). The softmax, masks, dropout and outputs are the mma.sync kernel's.
constexpr int kWarpgroupThreads = 128, kWgRows = 64, kWgThreads = 2 * kWarpgroupThreads, kWgD = 64;
constexpr int kWgTileBytes = kBlock * kWgD * 2;  // 8 KB: a swizzled tile of 64 rows
constexpr int kWgSharedBytes = (kOwnRows * kWgD * 2 + 4 * kWgTileBytes) + 1024;  // + alignment to 1024

// Starts copying rows [row0, row0 + ROWS) of a matrix (row stride ld, 64 columns from
// `base`) into a swizzled tile (cp.async) with THREADS threads, zeros past `rows`.
template <int ROWS, int THREADS = kWgThreads>
__device__ void load_swizzled_tile(const bf16* base, int64_t ld, int64_t row0, int64_t rows, bf16* tile) {
  constexpr int kRowStep = THREADS / 8;
  const int r = static_cast<int>(threadIdx.x) / 8, c = static_cast<int>(threadIdx.x) % 8;
#pragma unroll
  for (int i = 0; i < ROWS / kRowStep; ++i) {
    const int tile_row = r + i * kRowStep;
    const int64_t row = row0 + tile_row;
    const bool valid = row < rows;
    detail::copy_async<16>(tile + tile_row * kWgD + detail::swizzled_chunk(tile_row, c) * 8,
                           base + (valid ? row : 0) * ld + c * 8, valid);
  }
}

// The first 1024-byte boundary of a block's dynamic shared memory (its launch asks for 1024
// bytes more): where the swizzled tiles start.
__device__ inline bf16* swizzled_tiles(unsigned char* shared) {
  return reinterpret_cast<bf16*>((reinterpret_cast<uintptr_t>(shared) + 1023) & ~uintptr_t{1023});
}

// Starts copying key tile kb's k and v (this head's columns of the qkv rows at `base`) into
// swizzled tiles.
__device__ inline void load_swizzled_kv(const bf16* base, int64_t row, int64_t C, int kb, int64_t T, bf16* k_tile,
                                        bf16* v_tile) {
  load_swizzled_tile<kBlock>(base + C, row, kb * kBlock, T, k_tile);
  load_swizzled_tile<kBlock>(base + 2 * C, row, kb * kBlock, T, v_tile);
}

// After a tile's copies are committed, with the next tile's (or none) committed after them:
// waits for this thread's, then makes everyone's visible to the tensor cores.
__device__ inline void wait_for_wgmma_tile() {
  detail::wait_async<1>();
  detail::fence_shared_for_wgmma();
  __syncthreads();
}

// A query-side warpgroup kernel's block (forward, dQ): its head and the head's columns of
// the batch's qkv rows (`base`, rows `row` apart); of the block's kOwnRows queries from t0,
// this warpgroup's 64 from group_first, the warp's 16 from first, the lane's two rows; the
// last key tile the block's queries see. Starting it issues the copies of the block's q
// (into q_tile) and of key tile 0 (into kv, as for_key_tiles reads it), for the caller to
// commit.
struct WgQueryBlock {
  Head s;
  int64_t row, t0;
  const bf16* base;
  int group, group_first, first, rows[2], last_tile;
};
__device__ inline WgQueryBlock start_wg_query_block(const bf16* qkv, int64_t T, int64_t C, int64_t H, bf16* q_tile,
                                                    bf16* kv) {
  WgQueryBlock b;
  b.s = head_of(T, C, H);
  b.row = 3 * C;
  b.t0 = own_rows<true>();
  b.base = qkv + b.s.b * T * b.row + b.s.h * kWgD;
  b.group = static_cast<int>(threadIdx.x) / kWarpgroupThreads;
  b.group_first = static_cast<int>(b.t0) + b.group * kWgRows;
  b.first = b.group_first + 16 * (static_cast<int>(threadIdx.x % kWarpgroupThreads) / 32);
  const int g = static_cast<int>(threadIdx.x % 32) / 4;
  b.rows[0] = b.first + g;
  b.rows[1] = b.first + g + 8;
  b.last_tile = last_key_tile(b.t0, T);
  load_swizzled_tile<kOwnRows>(b.base, b.row, b.t0, T, q_tile);
  load_swizzled_kv(b.base, b.row, C, 0, T, kv, kv + 2 * kBlock * kWgD);
  return b;
}

// The key tiles of a query-side warpgroup kernel's block, k and v double-buffered (k[2],
// then v[2], [64][64] swizzled from `kv`; tile 0's copy committed): the next tile is copied
// while f(k, v, u0) runs on this one, for each tile the warpgroup's queries see. Its
// products are collective: it skips a tile only as a whole (every key after its queries, or
// its queries past T).
template <typename F>
__device__ inline void for_key_tiles(const WgQueryBlock& b, int64_t C, int64_t T, bf16* kv, F f) {
  auto k_tile = [&](int buffer) { return kv + buffer * kBlock * kWgD; };
  auto v_tile = [&](int buffer) { return k_tile(2 + buffer); };
  for (int kb = 0; kb <= b.last_tile; ++kb) {
    const int buffer = kb & 1;
    if (kb < b.last_tile) load_swizzled_kv(b.base, b.row, C, kb + 1, T, k_tile(buffer ^ 1), v_tile(buffer ^ 1));
    detail::commit_async();
    wait_for_wgmma_tile();
    const int u0 = kb * kBlock;
    if (u0 <= b.group_first + kWgRows - 1 && b.group_first < T) f(k_tile(buffer), v_tile(buffer), u0);
    __syncthreads();  // this buffer is refilled next iteration
  }
}

// Dropout on P (or dP) of a whole 64-key tile of a warp's rows from u0: its two halves.
template <Drop DROP>
__device__ inline void drop_tile(float (&p)[kBlock / 8][4], const Head& s, const KeepMask<const uint32_t>& mask,
                                 const cpu::DropoutSpec& dropout, const int (&rows)[2], int u0, float keep_scale) {
#pragma unroll
  for (int half = 0; half < 2; ++half)
    drop_half<DROP>(*reinterpret_cast<float(*)[kHalf / 8][4]>(p[half * kHalf / 8]), s, mask, dropout, rows,
                    u0 + half * kHalf, keep_scale);
}

// acc += P B: P (a warpgroup's accumulator tile over 64 keys) as the A operand from
// registers, B the 64 x 64 tile at `b` stored [key][column] (read transposed: 16 rows, 2048
// bytes, a k step); waits for the products.
__device__ inline void wgmma_accumulate_pb(float (&acc)[kWgD / 8][4], const float (&p)[kBlock / 8][4], uint64_t b) {
  uint32_t a[kBlock / 16][4];
#pragma unroll
  for (int ks = 0; ks < kBlock / 16; ++ks) accumulators_as_a(p, ks, a[ks]);
  detail::wgmma_hold(acc);
  detail::wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kBlock / 16; ++ks) detail::wgmma_64x64x16(acc, a[ks], b + (16 * kWgD * 2 >> 4) * ks);
  detail::wgmma_commit();
  detail::wgmma_wait<0>();
  detail::wgmma_hold(acc);
}

template <Drop DROP>
__global__ void __launch_bounds__(kWgThreads)
    flash_forward_wgmma_kernel(const bf16* qkv, int64_t T, int64_t C, int64_t H, float scale,
                               cpu::DropoutSpec dropout, KeepMask<const uint32_t> mask, bf16* out, float* lse) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = kWgD;
  constexpr bool DROPOUT = DROP != Drop::kOff;
  const float keep_scale = start_dropout<DROP>(dropout);
  extern __shared__ unsigned char wg_shared[];
  // q [kOwnRows][64], then k[2], v[2] [64][64], each swizzled, from a 1024-byte boundary
  bf16* q_tile = swizzled_tiles(wg_shared);
  bf16* kv_tiles = q_tile + kOwnRows * D;
  const WgQueryBlock q = start_wg_query_block(qkv, T, C, H, q_tile, kv_tiles);
  detail::commit_async();
  const Head& s = q.s;
  const float scale2 = scale * kLog2e;
  const uint64_t q_desc = detail::wgmma_descriptor(q_tile + q.group * kWgRows * D);
  float o[D / 8][4] = {}, m[2] = {-INFINITY, -INFINITY}, l[2] = {};
  for_key_tiles(q, C, T, kv_tiles, [&](const bf16* k, const bf16* v, int u0) {
    float p[kBlock / 8][4];  // written by the first k step
    detail::wgmma_fence();
    detail::wgmma_64x64<D / 16>(p, q_desc, detail::wgmma_descriptor(k));
    detail::wgmma_commit();
    detail::wgmma_wait<0>();
    detail::wgmma_hold(p);
    if (u0 + kBlock - 1 > q.first || u0 + kBlock > T) mask_scores<false>(p, q.rows, u0, static_cast<int>(T), -INFINITY);
    online_softmax(p, scale2, m, l, o);
    if constexpr (DROPOUT) drop_tile<DROP>(p, s, mask, dropout, q.rows, u0, keep_scale);
    wgmma_accumulate_pb(o, p, detail::wgmma_descriptor(v));  // out += P v
  });
  store_forward_rows<D>(o, m, l, q.rows, s, out, lse);
#endif
}

// dK, dV: a block takes kOwnRows keys, the query tiles from its first key on. The block's
// k and v stay in shared memory (A fragments re-read per use: registers hold dK, dV).
template <int D> constexpr int kv_shared_bytes() {
  return (2 * kOwnRows * kStride<D> + 4 * kTileElems<D>) * static_cast<int>(sizeof(bf16)) +
         4 * kBlock * static_cast<int>(sizeof(float));
}
template <int D, Drop DROP>
__global__ void __launch_bounds__(kThreads)
    flash_backward_kv_kernel(const bf16* qkv, const bf16* grad_out, const float* lse, const float* delta, int64_t T,
                             int64_t C, int64_t H, float scale, cpu::DropoutSpec dropout, KeepMask<const uint32_t> mask,
                             bf16* grad_qkv) {
  constexpr bool DROPOUT = DROP != Drop::kOff;
  const float keep_scale = start_dropout<DROP>(dropout);
  // the block's k and v; two buffers of q, dout, lse and delta
  extern __shared__ __align__(16) bf16 shared[];
  bf16* k_own = shared;
  bf16* v_own = k_own + kOwnRows * kStride<D>;
  auto q_tile = [&](int buffer) { return v_own + kOwnRows * kStride<D> + buffer * kTileElems<D>; };
  auto do_tile = [&](int buffer) { return q_tile(2 + buffer); };
  float* lse_s = reinterpret_cast<float*>(q_tile(4));  // [2][kBlock], then delta's
  float* delta_s = lse_s + 2 * kBlock;
  const int warp = threadIdx.x / 32;
  const Head s = head_of(T, C, H);
  const int64_t row = 3 * C, k0 = own_rows<false>();
  const bf16* base = qkv + s.b * T * row + s.h * D;
  const bf16* go = grad_out + s.b * T * C + s.h * D;
  const float scale2 = scale * kLog2e;
  load_tile<D, kOwnRows>(base + C, row, k0, T, k_own);
  load_tile<D, kOwnRows>(base + 2 * C, row, k0, T, v_own);
  auto issue = [&](int qb, int buffer) {
    load_tile<D>(base, row, static_cast<int64_t>(qb) * kBlock, T, q_tile(buffer));
    load_tile<D>(go, C, static_cast<int64_t>(qb) * kBlock, T, do_tile(buffer));
    for (int i = static_cast<int>(threadIdx.x); i < 2 * kBlock; i += kThreads) {  // lse, then delta
      const int local = i % kBlock;
      const int64_t t = static_cast<int64_t>(qb) * kBlock + local;
      const float* source = i < kBlock ? lse : delta;
      float* target = (i < kBlock ? lse_s : delta_s) + buffer * kBlock;
      detail::copy_async<4>(target + local, source + s.bh * T + (t < T ? t : 0), t < T);
    }
  };
  float dk[kMTiles][D / 8][4] = {}, dv[kMTiles][D / 8][4] = {};
  const int first = static_cast<int>(k0) + warp * kWarpRows;  // this warp's first key
  const WarpRows ku = warp_rows(first);
  const SharedA<D> k_a{k_own, warp * kWarpRows}, v_a{v_own, warp * kWarpRows};
  const int first_tile = static_cast<int>(k0 / kBlock), query_tiles = static_cast<int>((T + kBlock - 1) / kBlock);
  issue(first_tile, 0);
  detail::commit_async();
  for (int qb = first_tile; qb < query_tiles; ++qb) {
    const int buffer = (qb - first_tile) & 1;
    if (qb + 1 < query_tiles) issue(qb + 1, buffer ^ 1);
    detail::commit_async();
    detail::wait_async<1>();
    __syncthreads();
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int t0 = qb * kBlock + half * kHalf, offset = half * kHalf;
      if (t0 + kHalf - 1 < first) continue;  // every query of the half is before this warp's keys
      const bf16* q_rows = q_tile(buffer) + offset * kStride<D>;
      const bf16* do_rows = do_tile(buffer) + offset * kStride<D>;
      const float* lse_h = lse_s + buffer * kBlock + offset;
      const float* delta_h = delta_s + buffer * kBlock + offset;
      // P^T [keys][queries] and, for dV, D P^T. Only halves reaching back to this warp's
      // keys (or past T) need the mask. (Rows past T are zeros: no contribution.)
      float p[kMTiles][kHalfTiles][4], pd[kMTiles][kHalfTiles][4];
      // With dropout: which elements the mask keeps (bit (mt kHalfTiles + j) 4 + e), made
      // once for both of its uses.
      static_assert(kMTiles * kHalfTiles * 4 <= 32, "the mask in one word");
      uint32_t kept = 0;
      product_nk<D, kHalfTiles>(k_a, q_rows, p);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        if (t0 < first + 16 * mt + 15 || t0 + kHalf > T || first + 16 * mt + 16 > T)
          mask_scores<true>(p[mt], ku.row[mt], t0, static_cast<int>(T), -INFINITY);
        if constexpr (DROPOUT)
          kept |= kept_transposed<DROP, kHalfTiles>(s, dropout, mask, ku.row[mt], first, t0) << (mt * kHalfTiles * 4);
#pragma unroll
        for (int j = 0; j < kHalfTiles; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int local = accumulator_column(j, e);
            p[mt][j][e] = exp2_fast(fmaf(p[mt][j][e], scale2, -lse_h[local]));
            pd[mt][j][e] = p[mt][j][e];
            if constexpr (DROPOUT) pd[mt][j][e] *= kept >> ((mt * kHalfTiles + j) * 4 + e) & 1u ? keep_scale : 0.0f;
          }
        }
      }
      accumulate_kn<D, kHalfTiles / 2>(pd, do_rows, dv);
      // dP^T = v dout^T; dS^T = P^T (D dP^T - delta) (times scale when dK is stored)
      product_nk<D, kHalfTiles>(v_a, do_rows, pd);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int j = 0; j < kHalfTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int local = accumulator_column(j, e);
            float dp = pd[mt][j][e];
            if constexpr (DROPOUT) dp *= kept >> ((mt * kHalfTiles + j) * 4 + e) & 1u ? keep_scale : 0.0f;
            pd[mt][j][e] = p[mt][j][e] * (dp - delta_h[local]);
          }
      accumulate_kn<D, kHalfTiles / 2>(pd, q_rows, dk);
    }
    __syncthreads();  // this buffer is refilled next iteration
  }
  auto grad_row = [&](int64_t u) { return grad_qkv + (s.b * T + u) * row + s.h * D; };
  store_rows<D>(dk, ku, T, [&](int64_t u) { return grad_row(u) + C; }, [&](int, int) { return scale; });
  store_rows<D>(dv, ku, T, [&](int64_t u) { return grad_row(u) + 2 * C; }, [](int, int) { return 1.0f; });
}

// delta_t = dout_t . out_t (= sum_u P_tu D_tu dP_tu, the softmax backward's row term) of
// this warp's 16 MT rows from `first`: a lane a row; every lane gets its accumulator rows'
// values (mine[mt][hh]) by shuffle, and stores its own row's.
template <int D, int MT>
__device__ void row_deltas(const bf16* grad_out, const bf16* out, int64_t row0, int64_t ld, int first, int64_t T,
                           float* delta, float (&mine)[MT][2]) {
  const int lane = threadIdx.x % 32, t = first + lane;
  const bool owner = lane < 16 * MT && t < T;
  float sum = 0;
  if (owner)
#pragma unroll
    for (int d = 0; d < D; d += 8) {
      float a[8], b[8];
      detail::load_bf16<8>(grad_out + (row0 + t) * ld + d, a);
      detail::load_bf16<8>(out + (row0 + t) * ld + d, b);
#pragma unroll
      for (int k = 0; k < 8; ++k) sum += a[k] * b[k];
    }
  if (owner) delta[t] = sum;
  const int g = lane / 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) mine[mt][hh] = __shfl_sync(0xffffffffu, sum, 16 * mt + g + 8 * hh);
}

// dS = P (dP - delta) over one m-tile's NT n8 tiles, in place of dP (dropout already applied
// to dP), P = exp2(s scale2 - lse) from the masked scores s (times scale when dQ is stored).
template <int NT>
__device__ inline void score_gradient(const float (&s)[NT][4], float (&dp)[NT][4], float scale2, const float (&row_lse)[2],
                                      const float (&row_delta)[2]) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int hh = e / 2;
      const float pe = exp2_fast(fmaf(s[j][e], scale2, -row_lse[hh]));
      dp[j][e] = pe * (dp[j][e] - row_delta[hh]);
    }
}

// dQ (and delta, which the dK/dV kernel reads after it): a block takes kOwnRows queries,
// the key tiles up to its last query.
template <int D, Drop DROP>
__global__ void __launch_bounds__(kThreads)
    flash_backward_q_kernel(const bf16* qkv, const bf16* grad_out, const bf16* out, const float* lse, int64_t T,
                            int64_t C, int64_t H, float scale, cpu::DropoutSpec dropout, KeepMask<const uint32_t> mask,
                            float* delta, bf16* grad_qkv) {
  constexpr bool DROPOUT = DROP != Drop::kOff;
  const float keep_scale = start_dropout<DROP>(dropout);
  // two buffers of k and v (the k buffers first bring this block's q, the v buffers its dout)
  __shared__ __align__(16) bf16 k_tile[2][kTileElems<D>], v_tile[2][kTileElems<D>];
  static_assert(kOwnRows <= 2 * kBlock, "the block's queries are staged through the two k buffers");
  const int warp = threadIdx.x / 32;
  const Head s = head_of(T, C, H);
  const int64_t row = 3 * C, t0 = own_rows<true>();
  const bf16* base = qkv + s.b * T * row + s.h * D;
  const float scale2 = scale * kLog2e;
  uint32_t qa[kMTiles][D / 16][4], doa[kMTiles][D / 16][4];
  load_tile<D, kOwnRows>(base, row, t0, T, k_tile[0]);
  load_tile<D, kOwnRows>(grad_out + s.b * T * C + s.h * D, C, t0, T, v_tile[0]);
  detail::commit_async();
  detail::wait_async<0>();
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      load_a<D>(k_tile[0], warp * kWarpRows + 16 * mt, ks, qa[mt][ks]);
      load_a<D>(v_tile[0], warp * kWarpRows + 16 * mt, ks, doa[mt][ks]);
    }
  __syncthreads();
  const int first = static_cast<int>(t0) + warp * kWarpRows;  // this warp's first query
  const WarpRows tq = warp_rows(first);
  float row_lse[kMTiles][2], row_delta[kMTiles][2];
  row_deltas<D, kMTiles>(grad_out + s.h * D, out + s.h * D, s.b * T, C, first, T, delta + s.bh * T, row_delta);
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) row_lse[mt][hh] = tq.row[mt][hh] < T ? lse[s.bh * T + tq.row[mt][hh]] : 0.0f;
  float dq[kMTiles][D / 8][4] = {};
  const int last_tile = last_key_tile(t0, T);
  load_kv<D>(base, row, C, 0, T, k_tile[0], v_tile[0]);
  detail::commit_async();
  for (int kb = 0; kb <= last_tile; ++kb) {
    const int buffer = kb & 1;
    if (kb < last_tile) load_kv<D>(base, row, C, kb + 1, T, k_tile[buffer ^ 1], v_tile[buffer ^ 1]);
    detail::commit_async();
    detail::wait_async<1>();
    __syncthreads();
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int u0 = kb * kBlock + half * kHalf;
      if (u0 > first + kWarpRows - 1) continue;  // every key of the half is after this warp's queries
      const bf16* k_rows = k_tile[buffer] + half * kHalf * kStride<D>;
      float p[kMTiles][kHalfTiles][4], ds[kMTiles][kHalfTiles][4];
      product_nk<D, kHalfTiles>(RegisterA<D>{qa}, k_rows, p);
      product_nk<D, kHalfTiles>(RegisterA<D>{doa}, v_tile[buffer] + half * kHalf * kStride<D>, ds);  // dP = dout v^T
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        if (u0 + kHalf - 1 > first + 16 * mt || u0 + kHalf > T)
          mask_scores<false>(p[mt], tq.row[mt], u0, static_cast<int>(T), -INFINITY);
        if constexpr (DROPOUT) drop_half<DROP>(ds[mt], s, mask, dropout, tq.row[mt], u0, keep_scale);
        score_gradient(p[mt], ds[mt], scale2, row_lse[mt], row_delta[mt]);
      }
      accumulate_kn<D, kHalfTiles / 2>(ds, k_rows, dq);
    }
    __syncthreads();  // this buffer is refilled next iteration
  }
  store_rows<D>(
      dq, tq, T, [&](int64_t t) { return grad_qkv + (s.b * T + t) * row + s.h * D; },
      [&](int, int) { return scale; });
}

// dQ (and delta) on Hopper's warpgroup products (sm_90a, head dim 64): the blocks of
// flash_backward_q_kernel as two warpgroups of 64 queries, the key tiles of 64 whole:
// S = q k^T and dP = dout v^T as eight m64n64k16 wgmma from shared memory, then
// dQ += dS k with dS from registers (k read transposed). The masks, dropout and dS are the
// mma.sync kernel's (drop_half, score_gradient).
constexpr int kWgGradQSharedBytes = 2 * kOwnRows * kWgD * 2 + 4 * kWgTileBytes + 1024;
template <Drop DROP>
__global__ void __launch_bounds__(kWgThreads)
    flash_backward_q_wgmma_kernel(const bf16* qkv, const bf16* grad_out, const bf16* out, const float* lse, int64_t T,
                                  int64_t C, int64_t H, float scale, cpu::DropoutSpec dropout,
                                  KeepMask<const uint32_t> mask, float* delta, bf16* grad_qkv) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = kWgD;
  constexpr bool DROPOUT = DROP != Drop::kOff;
  const float keep_scale = start_dropout<DROP>(dropout);
  extern __shared__ unsigned char wg_shared[];
  // q and dout [kOwnRows][64], then k[2], v[2] [64][64], each swizzled, from a 1024-byte boundary
  bf16* q_tile = swizzled_tiles(wg_shared);
  bf16* do_tile = q_tile + kOwnRows * D;
  bf16* kv_tiles = do_tile + kOwnRows * D;
  const WgQueryBlock q = start_wg_query_block(qkv, T, C, H, q_tile, kv_tiles);
  const Head& s = q.s;
  load_swizzled_tile<kOwnRows>(grad_out + s.b * T * C + s.h * D, C, q.t0, T, do_tile);
  detail::commit_async();
  const float scale2 = scale * kLog2e;
  float row_lse[1][2], row_delta[1][2];
  row_deltas<D, 1>(grad_out + s.h * D, out + s.h * D, s.b * T, C, q.first, T, delta + s.bh * T, row_delta);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) row_lse[0][hh] = q.rows[hh] < T ? lse[s.bh * T + q.rows[hh]] : 0.0f;
  const uint64_t q_desc = detail::wgmma_descriptor(q_tile + q.group * kWgRows * D);
  const uint64_t do_desc = detail::wgmma_descriptor(do_tile + q.group * kWgRows * D);
  float dq[D / 8][4] = {};
  for_key_tiles(q, C, T, kv_tiles, [&](const bf16* k, const bf16* v, int u0) {
    float p[kBlock / 8][4], ds[kBlock / 8][4];  // written by the first k step
    const uint64_t k_desc = detail::wgmma_descriptor(k);
    detail::wgmma_fence();
    detail::wgmma_64x64<D / 16>(p, q_desc, k_desc);
    detail::wgmma_64x64<D / 16>(ds, do_desc, detail::wgmma_descriptor(v));  // dP = dout v^T
    detail::wgmma_commit();
    detail::wgmma_wait<0>();
    detail::wgmma_hold(p);
    detail::wgmma_hold(ds);
    if (u0 + kBlock - 1 > q.first || u0 + kBlock > T) mask_scores<false>(p, q.rows, u0, static_cast<int>(T), -INFINITY);
    if constexpr (DROPOUT) drop_tile<DROP>(ds, s, mask, dropout, q.rows, u0, keep_scale);
    score_gradient(p, ds, scale2, row_lse[0], row_delta[0]);
    wgmma_accumulate_pb(dq, ds, k_desc);  // dQ += dS k
  });
#pragma unroll
  for (int hh = 0; hh < 2; ++hh)
    if (q.rows[hh] < T) store_row<D>(dq, hh, scale, grad_qkv + (s.b * T + q.rows[hh]) * q.row + s.h * D);
#endif
}

// dK, dV on Hopper's warpgroup products (sm_90a, head dim 64): a block is one
// warpgroup of 64 keys (168 registers: three blocks a multiprocessor, each with barriers of
// its own, so that one's softmax runs beside another's products), the query tiles of 64
// whole. S^T = k q^T and dP^T = v dout^T from shared memory; dV += P^T dout and dK += dS^T q
// with P^T and dS^T from registers (dout and q read transposed). Dropout as the mma.sync
// kernel's: D P^T for dV, dS^T = P^T (D dP^T - delta); held to three blocks too (236-240
// registers otherwise; 84-124 bytes spill: 311.6 -> 277.3 us a layer). Without dropout the
// compiler's own choice (0: no minimum; 1 would let it take 204).
constexpr int kWgGradKvSharedBytes = 2 * kWgRows * kWgD * 2 + 4 * kWgTileBytes + 4 * kBlock * 4 + 1024;
template <Drop DROP>
__global__ void __launch_bounds__(kWarpgroupThreads, DROP == Drop::kOff ? 0 : 3)
    flash_backward_kv_wgmma_kernel(const bf16* qkv, const bf16* grad_out, const float* lse, const float* delta,
                                   int64_t T, int64_t C, int64_t H, float scale, cpu::DropoutSpec dropout,
                                   KeepMask<const uint32_t> mask, bf16* grad_qkv) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = kWgD;
  constexpr bool DROPOUT = DROP != Drop::kOff;
  const float keep_scale = start_dropout<DROP>(dropout);
  extern __shared__ unsigned char wg_shared[];
  // k and v [64][64], then q[2], dout[2] [64][64], each swizzled, from a 1024-byte boundary;
  // then lse[2][64] and delta[2][64]
  bf16* k_own = swizzled_tiles(wg_shared);
  bf16* v_own = k_own + kWgRows * D;
  auto q_tile = [&](int buffer) { return v_own + kWgRows * D + buffer * kBlock * D; };
  auto do_tile = [&](int buffer) { return q_tile(2 + buffer); };
  float* lse_s = reinterpret_cast<float*>(q_tile(4));
  float* delta_s = lse_s + 2 * kBlock;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const Head s = head_of(T, C, H);
  const int64_t row = 3 * C, k0 = static_cast<int64_t>(blockIdx.y) * kWgRows;  // early keys (the heaviest) first
  const bf16* base = qkv + s.b * T * row + s.h * D;
  const bf16* go = grad_out + s.b * T * C + s.h * D;
  const float scale2 = scale * kLog2e;
  load_swizzled_tile<kWgRows, kWarpgroupThreads>(base + C, row, k0, T, k_own);
  load_swizzled_tile<kWgRows, kWarpgroupThreads>(base + 2 * C, row, k0, T, v_own);
  auto issue = [&](int qb, int buffer) {
    load_swizzled_tile<kBlock, kWarpgroupThreads>(base, row, static_cast<int64_t>(qb) * kBlock, T, q_tile(buffer));
    load_swizzled_tile<kBlock, kWarpgroupThreads>(go, C, static_cast<int64_t>(qb) * kBlock, T, do_tile(buffer));
    for (int i = static_cast<int>(threadIdx.x); i < 2 * kBlock; i += kWarpgroupThreads) {  // lse, then delta
      const int local = i % kBlock;
      const int64_t t = static_cast<int64_t>(qb) * kBlock + local;
      const float* source = i < kBlock ? lse : delta;
      float* target = (i < kBlock ? lse_s : delta_s) + buffer * kBlock;
      detail::copy_async<4>(target + local, source + s.bh * T + (t < T ? t : 0), t < T);
    }
  };
  const int first = static_cast<int>(k0) + 16 * warp, g = static_cast<int>(threadIdx.x % 32) / 4;
  const int keys[2] = {first + g, first + g + 8};
  const uint64_t k_desc = detail::wgmma_descriptor(k_own), v_desc = detail::wgmma_descriptor(v_own);
  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  const int first_tile = static_cast<int>(k0 / kBlock), query_tiles = static_cast<int>((T + kBlock - 1) / kBlock);
  issue(first_tile, 0);
  detail::commit_async();
  for (int qb = first_tile; qb < query_tiles; ++qb) {
    const int buffer = (qb - first_tile) & 1;
    if (qb + 1 < query_tiles) issue(qb + 1, buffer ^ 1);
    detail::commit_async();
    wait_for_wgmma_tile();
    const int t0 = qb * kBlock;
    const uint64_t q_desc = detail::wgmma_descriptor(q_tile(buffer));
    const uint64_t do_desc = detail::wgmma_descriptor(do_tile(buffer));
    const float* lse_t = lse_s + buffer * kBlock;
    const float* delta_t = delta_s + buffer * kBlock;
    float p[kBlock / 8][4], dp[kBlock / 8][4];  // written by the first k step
    detail::wgmma_fence();
    detail::wgmma_64x64<D / 16>(p, k_desc, q_desc);    // S^T = k q^T
    detail::wgmma_64x64<D / 16>(dp, v_desc, do_desc);  // dP^T = v dout^T
    detail::wgmma_commit();
    detail::wgmma_wait<0>();
    detail::wgmma_hold(p);
    detail::wgmma_hold(dp);
    // P^T [keys][queries]; only tiles reaching back to this warp's keys (or past T) need
    // the mask (rows past T are zeros: no contribution)
    if (t0 < first + 15 || t0 + kBlock > T || first + 16 > T)
      mask_scores<true>(p, keys, t0, static_cast<int>(T), -INFINITY);
    const uint32_t kept = DROPOUT ? kept_transposed<DROP, kBlock / 8>(s, dropout, mask, keys, first, t0) : 0u;
#pragma unroll
    for (int j = 0; j < kBlock / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int local = accumulator_column(j, e);
        p[j][e] = exp2_fast(fmaf(p[j][e], scale2, -lse_t[local]));
        const float keep = DROPOUT && !(kept >> (4 * j + e) & 1u) ? 0.0f : keep_scale;
        if constexpr (DROPOUT) dp[j][e] *= keep;
        dp[j][e] = p[j][e] * (dp[j][e] - delta_t[local]);  // dS^T (times scale when dK is stored)
        if constexpr (DROPOUT) p[j][e] *= keep;            // D P^T, for dV
      }
    uint32_t pa[kBlock / 16][4], dsa[kBlock / 16][4];  // made before the products, which read them
#pragma unroll
    for (int ks = 0; ks < kBlock / 16; ++ks) accumulators_as_a(p, ks, pa[ks]), accumulators_as_a(dp, ks, dsa[ks]);
    detail::wgmma_hold(dv);
    detail::wgmma_hold(dk);
    detail::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBlock / 16; ++ks) {  // 16 rows of dout and q a k step: 2048 bytes
      detail::wgmma_64x64x16(dv, pa[ks], do_desc + (16 * D * 2 >> 4) * ks);
      detail::wgmma_64x64x16(dk, dsa[ks], q_desc + (16 * D * 2 >> 4) * ks);
    }
    detail::wgmma_commit();
    detail::wgmma_wait<0>();
    detail::wgmma_hold(dv);
    detail::wgmma_hold(dk);
    __syncthreads();  // this buffer is refilled next iteration
  }
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    if (keys[hh] >= T) continue;
    bf16* grad_row = grad_qkv + (s.b * T + keys[hh]) * row + s.h * D;
    store_row<D>(dk, hh, scale, grad_row + C);
    store_row<D>(dv, hh, 1.0f, grad_row + 2 * C);
  }
#endif
}

struct Geometry {
  int64_t T, C, H, d;
};
Geometry geometry_of(const cpu::AttentionShape& s) {
  check(s.batch >= 1 && s.seq >= 1 && s.heads >= 1 && s.C % s.heads == 0, "attention: bad shape");
  check(s.seq <= int64_t{65535} * kOwnRows, "attention: sequence length out of range");
  check(attention_head_dim_supported(s.C / s.heads),
        "hidden_size / num_attention_heads: the CUDA attention takes head dims 16, 32 or 64, got " +
            std::to_string(s.C / s.heads));
  return {s.seq, s.C, s.heads, s.C / s.heads};
}

// launch(head dim, Drop) as integral constants: Drop::kBits where the mask is given.
template <typename Launch>
void dispatch_kernel(int64_t d, cpu::DropoutSpec dropout, const uint32_t* keep_mask, Launch&& launch) {
  auto with_dropout = [&](auto D) {
    detail::dispatch_drop(dropout.p, keep_mask != nullptr, [&](auto drop) { launch(D, drop); });
  };
  switch (d) {
    case 16: with_dropout(std::integral_constant<int, 16>{}); break;
    case 32: with_dropout(std::integral_constant<int, 32>{}); break;
    default: with_dropout(std::integral_constant<int, 64>{}); break;
  }
}
// Whether the warpgroup kernels run: built for sm_90a (MHC_CUDA_SM90A), on a device of
// compute capability 9.0, and not turned off by set_attention_wgmma.
bool wgmma_allowed = true;
bool wgmma_available() {
#ifdef MHC_CUDA_SM90A
  static const bool hopper = [] {
    int device = 0, major = 0, minor = 0;
    MHC_CUDA_CHECK(cudaGetDevice(&device));
    MHC_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    MHC_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    return major == 9 && minor == 0;
  }();
  return hopper && wgmma_allowed;
#else
  return false;
#endif
}
// Whether a layer's attention runs on the warpgroup kernels: head dim 64, the grid's rows
// of 64 keys (dK/dV's blocks, the smallest) in range, on a device that has them.
bool use_wgmma(const Geometry& g) { return g.d == kWgD && g.T <= int64_t{65535} * kWgRows && wgmma_available(); }
// Blocks of `rows` queries (or keys): batch x heads, row blocks.
dim3 attention_grid(const cpu::AttentionShape& s, const Geometry& g, int rows) {
  return dim3(detail::blocks_for(s.batch * g.H, 1), detail::blocks_for(g.T, rows));
}

template <typename Word>
KeepMask<Word> keep_mask_of(const Geometry& g, Word* words) {
  return {words, (g.T + 31) / 32};
}

}  // namespace

bool attention_head_dim_supported(int64_t d) { return d == 16 || d == 32 || d == 64; }

void set_attention_wgmma(bool allowed) { wgmma_allowed = allowed; }

size_t attention_workspace_bytes(const cpu::AttentionShape& s) {
  return static_cast<size_t>(s.batch * s.heads * s.seq) * sizeof(float);
}

size_t attention_keep_mask_words(const cpu::AttentionShape& s) {
  return static_cast<size_t>(s.batch * s.heads * s.seq * ((s.seq + 31) / 32));
}

void attention_forward(const cpu::AttentionShape& s, const bf16* qkv, cpu::DropoutSpec dropout, float* lse, bf16* out,
                       cudaStream_t stream, uint32_t* keep_mask) {
  const Geometry g = geometry_of(s);
  const dim3 grid = attention_grid(s, g, kOwnRows);
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.d));
  if (dropout.p > 0.0f && keep_mask) {
    const KeepMask<uint32_t> mask = keep_mask_of(g, keep_mask);
    const dim3 bands(detail::blocks_for(s.batch * g.H * mask.per_row, 1), detail::blocks_for(32 * mask.per_row, 256));
    keep_mask_kernel<<<bands, 256, 0, stream>>>(g.T, dropout, mask);
    MHC_CUDA_CHECK(cudaGetLastError());
  }
  if (use_wgmma(g)) {
    detail::dispatch_drop(dropout.p, keep_mask != nullptr, [&](auto drop) {
      const auto kernel = flash_forward_wgmma_kernel<decltype(drop)::value>;
      allow_shared_bytes(kernel, kWgSharedBytes);
      kernel<<<grid, kWgThreads, kWgSharedBytes, stream>>>(
          qkv, g.T, g.C, g.H, scale, dropout, keep_mask_of(g, static_cast<const uint32_t*>(keep_mask)), out, lse);
    });
    MHC_CUDA_CHECK(cudaGetLastError());
    return;
  }
  dispatch_kernel(g.d, dropout, keep_mask, [&](auto Dc, auto drop) {
    constexpr int D = decltype(Dc)::value;
    const auto kernel = flash_forward_kernel<D, decltype(drop)::value>;
    const int shared = (kOwnRows + 4 * kBlock) * kStride<D> * static_cast<int>(sizeof(bf16));
    allow_shared_bytes(kernel, shared);
    kernel<<<grid, kThreads, shared, stream>>>(qkv, g.T, g.C, g.H, scale, dropout,
                                               keep_mask_of(g, static_cast<const uint32_t*>(keep_mask)), out, lse);
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

void attention_backward(const cpu::AttentionShape& s, const bf16* grad_out, const bf16* qkv, const bf16* out,
                        const float* lse, cpu::DropoutSpec dropout, bf16* grad_qkv, void* workspace,
                        cudaStream_t stream, const uint32_t* keep_mask) {
  const Geometry g = geometry_of(s);
  float* delta = static_cast<float*>(workspace);
  const dim3 grid = attention_grid(s, g, kOwnRows);
  const bool wgmma = use_wgmma(g);
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.d));
  const KeepMask<const uint32_t> mask = keep_mask_of(g, keep_mask);
  dispatch_kernel(g.d, dropout, keep_mask, [&](auto Dc, auto drop) {
    constexpr int D = decltype(Dc)::value;
    constexpr Drop DROP = decltype(drop)::value;
    if (wgmma) {
      const auto q_kernel = flash_backward_q_wgmma_kernel<DROP>;
      allow_shared_bytes(q_kernel, kWgGradQSharedBytes);
      q_kernel<<<grid, kWgThreads, kWgGradQSharedBytes, stream>>>(qkv, grad_out, out, lse, g.T, g.C, g.H, scale,
                                                                   dropout, mask, delta, grad_qkv);
    } else {
      flash_backward_q_kernel<D, DROP><<<grid, kThreads, 0, stream>>>(qkv, grad_out, out, lse, g.T, g.C, g.H, scale,
                                                                      dropout, mask, delta, grad_qkv);
    }
    MHC_CUDA_CHECK(cudaGetLastError());
    if (wgmma) {
      const auto kv_kernel = flash_backward_kv_wgmma_kernel<DROP>;
      allow_shared_bytes(kv_kernel, kWgGradKvSharedBytes);
      kv_kernel<<<attention_grid(s, g, kWgRows), kWarpgroupThreads, kWgGradKvSharedBytes, stream>>>(
          qkv, grad_out, lse, delta, g.T, g.C, g.H, scale, dropout, mask, grad_qkv);
      return;
    }
    const auto kv_kernel = flash_backward_kv_kernel<D, DROP>;
    allow_shared_bytes(kv_kernel, kv_shared_bytes<D>());
    kv_kernel<<<grid, kThreads, kv_shared_bytes<D>(), stream>>>(qkv, grad_out, lse, delta, g.T, g.C, g.H, scale,
                                                                dropout, mask, grad_qkv);
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mhc::cuda
