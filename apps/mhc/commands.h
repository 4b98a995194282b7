// Subcommands of the `mhc` tool. Each registers its options on the CLI11 app and returns
// the exit code when run: 0 success, 1 a check failed, 2 bad input (message on stderr).
#pragma once
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>

namespace mhc::app {

using Command = std::function<int()>;

// A number of at least `min` (whole: an integer), for counts and similar options. CLI11's
// PositiveNumber and NonNegativeNumber reject a value with "Value 0 not in range 0.000000 to
// 1797693134862315...000.000000", which buries the point (and for 0 reads as if it were allowed).
inline CLI::Validator at_least(double min, bool whole) {
  char bound[32];
  std::snprintf(bound, sizeof bound, "%g", min);
  const std::string what = std::string(whole ? "a whole number" : "a number") + " of at least " + bound;
  return CLI::Validator(
      [=](std::string& value) -> std::string {
        try {
          size_t used = 0;
          const double v = std::stod(value, &used);
          if (used == value.size() && v >= min && (!whole || v == std::floor(v))) return {};
        } catch (const std::exception&) {
        }
        return "must be " + what + ", got " + value;
      },
      std::string(whole ? "INT" : "NUM") + ">=" + bound);
}

Command add_parity_command(CLI::App& app);
Command add_check_grad_command(CLI::App& app);
Command add_train_command(CLI::App& app);
Command add_eval_command(CLI::App& app);
Command add_generate_command(CLI::App& app);
Command add_report_command(CLI::App& app);
Command add_bench_memory_command(CLI::App& bench);   // under `mhc bench`
Command add_bench_kernels_command(CLI::App& bench);  // under `mhc bench`
Command add_bench_train_command(CLI::App& bench);    // under `mhc bench`

}  // namespace mhc::app
