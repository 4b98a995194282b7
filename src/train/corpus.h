// The built-in training corpus: deterministic text with structure a small model learns
// in minutes, so `mhc train` works with no download. Lines mix three tasks:
//   arithmetic      "17+25=42."
//   key-value recall "set k3=7; set k9=2; get k3:7."
//   a small grammar  "the old cat sees a red box."
#pragma once
#include <cstdint>
#include <string>

namespace mhc {

std::string builtin_corpus(uint64_t seed, int64_t bytes);

}  // namespace mhc
