#include "train/corpus.h"

#include <array>

#include "core/rng.h"

namespace mhc {

namespace {

class Draw {
 public:
  explicit Draw(uint64_t seed) : key_(rng_key(seed, 0xC0, 0x1A)) {}
  uint32_t below(uint32_t n) { return philox4x32(counter_++, 0, key_).v[0] % n; }
  template <typename T, size_t K> const T& pick(const std::array<T, K>& items) { return items[below(K)]; }

 private:
  uint64_t key_;
  uint64_t counter_ = 0;
};

constexpr std::array<const char*, 6> kDeterminers = {"the", "a", "one", "this", "that", "every"};
constexpr std::array<const char*, 8> kAdjectives = {"old", "red", "small", "quiet", "green", "big", "odd", "tall"};
constexpr std::array<const char*, 8> kNouns = {"cat", "dog", "box", "tree", "bird", "car", "lamp", "fox"};
constexpr std::array<const char*, 6> kVerbs = {"sees", "likes", "finds", "moves", "hears", "keeps"};

void arithmetic(Draw& d, std::string& out) {
  const uint32_t a = d.below(50), b = d.below(50);
  out += std::to_string(a) + "+" + std::to_string(b) + "=" + std::to_string(a + b) + ".\n";
}

void recall(Draw& d, std::string& out) {
  uint32_t keys[4], values[4];
  const uint32_t count = 2 + d.below(3);
  for (uint32_t i = 0; i < count; ++i) {
    keys[i] = d.below(10);
    values[i] = d.below(10);
    out += "set k" + std::to_string(keys[i]) + "=" + std::to_string(values[i]) + "; ";
  }
  // The last assignment of the asked key wins.
  const uint32_t asked = keys[d.below(count)];
  uint32_t answer = 0;
  for (uint32_t i = 0; i < count; ++i)
    if (keys[i] == asked) answer = values[i];
  out += "get k" + std::to_string(asked) + ":" + std::to_string(answer) + ".\n";
}

void sentence(Draw& d, std::string& out) {
  out += std::string(d.pick(kDeterminers)) + " " + d.pick(kAdjectives) + " " + d.pick(kNouns) + " " +
         d.pick(kVerbs) + " " + d.pick(kDeterminers) + " " + d.pick(kAdjectives) + " " + d.pick(kNouns) + ".\n";
}

}  // namespace

std::string builtin_corpus(uint64_t seed, int64_t bytes) {
  Draw d(seed);
  std::string out;
  out.reserve(static_cast<size_t>(bytes) + 128);
  while (static_cast<int64_t>(out.size()) < bytes) {
    switch (d.below(3)) {
      case 0: arithmetic(d, out); break;
      case 1: recall(d, out); break;
      default: sentence(d, out); break;
    }
  }
  out.resize(static_cast<size_t>(bytes));
  return out;
}

}  // namespace mhc
