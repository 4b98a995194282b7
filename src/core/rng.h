// Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11).
//
// Every random value is a pure function of (key, counter), so a dropout mask can be
// replayed exactly (selective recompute, resume) without any generator state to save or
// advance. The key identifies the use (seed, layer, step, site); the counter the element.
// Usable from host and device code.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MHC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MHC_HOST_DEVICE inline
#endif

namespace mhc {

struct Philox4x32 {
  uint32_t v[4];
};

MHC_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

// Ten rounds of Philox4x32 on the 128-bit counter under the 64-bit key.
MHC_HOST_DEVICE Philox4x32 philox4x32(uint64_t counter_lo, uint64_t counter_hi, uint64_t key) {
  uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(counter_hi), c3 = static_cast<uint32_t>(counter_hi >> 32);
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, c0, hi0, lo0);
    philox_mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// Uniform in [0, 1) with 24 random bits, exactly representable in float.
MHC_HOST_DEVICE float uint_to_unit_float(uint32_t bits) {
  return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);
}

// Mixes a few identifiers (seed, layer, step, site) into one Philox key.
MHC_HOST_DEVICE uint64_t rng_key(uint64_t seed, uint64_t a = 0, uint64_t b = 0, uint64_t c = 0) {
  const Philox4x32 r = philox4x32(a | (b << 32), c, seed);
  return (static_cast<uint64_t>(r.v[1]) << 32) | r.v[0];
}

// Uniform [0,1) value number `index` of the stream `key`; four values per Philox call.
MHC_HOST_DEVICE float rng_uniform(uint64_t key, uint64_t index) {
  const Philox4x32 r = philox4x32(index >> 2, 0, key);
  return uint_to_unit_float(r.v[index & 3]);
}

}  // namespace mhc

namespace mhc {

// The scale of a kept element, 1/(1-p): every kernel that applies a mask takes it from
// here, so that all give dropout_scale's bits.
template <typename T>
MHC_HOST_DEVICE T dropout_kept_scale(float p) {
  return T(1) / (T(1) - T(p));
}

// Inverted dropout: element `index` of stream `key` is kept with probability 1-p and then
// scaled by 1/(1-p); p = 0 keeps everything with scale exactly 1.
template <typename T> MHC_HOST_DEVICE T dropout_scale(uint64_t key, uint64_t index, float p) {
  if (p <= 0.0f) return T(1);
  return rng_uniform(key, index) >= p ? dropout_kept_scale<T>(p) : T(0);
}

// dropout_scale's keep decision, uint_to_unit_float(bits) >= p, as an integer comparison:
// (bits >> 8) >= ceil(p 2^24), exact because p 2^24 is p scaled by a power of two (p in (0, 1]).
MHC_HOST_DEVICE uint32_t dropout_keep_threshold(float p) { return static_cast<uint32_t>(ceilf(p * 16777216.0f)); }

// dropout_scale's keep decisions (bit q: element first + q kept) of four elements from one
// Philox call: first % 4 == 0, p > 0.
MHC_HOST_DEVICE uint32_t dropout_keep_bits4(uint64_t key, uint64_t first, float p) {
  const Philox4x32 r = philox4x32(first >> 2, 0, key);
  const uint32_t threshold = dropout_keep_threshold(p);
  uint32_t bits = 0;
  for (int q = 0; q < 4; ++q) bits |= static_cast<uint32_t>((r.v[q] >> 8) >= threshold) << q;
  return bits;
}

}  // namespace mhc
