// Subcommands of the `mhc` tool. Each registers its options on the CLI11 app and returns
// the exit code when run: 0 success, 1 a check failed, 2 bad input (message on stderr).
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <string>

namespace mhc::app {

using Command = std::function<int()>;

// Counts (steps, repeats, layers, ...): a whole number of at least 1. CLI11's PositiveNumber
// rejects 0 with "Value 0 not in range 0.000000 to 1.797693e+308", which reads as if 0 were
// allowed.
inline const CLI::Validator kAtLeastOne(
    [](std::string& value) -> std::string {
      try {
        if (std::stoll(value) >= 1) return {};
      } catch (const std::exception&) {
      }
      return "must be a whole number of at least 1, got " + value;
    },
    "INT>=1");

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
