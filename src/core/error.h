// Errors: one exception type for every user-facing failure (bad input, bad file, bad
// configuration). The message names the field or file at fault; apps turn it into one
// line on stderr and exit code 2.
#pragma once
#include <stdexcept>
#include <string>

namespace mhc {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail(const std::string& message) { throw Error(message); }

inline void check(bool condition, const std::string& message) {
  if (!condition) fail(message);
}

}  // namespace mhc
