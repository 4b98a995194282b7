// Subcommands of the `mhc` tool. Each registers its options on the CLI11 app and returns
// the exit code when run: 0 success, 1 a check failed, 2 bad input (message on stderr).
#pragma once
#include <CLI/CLI.hpp>
#include <functional>

namespace mhc::app {

using Command = std::function<int()>;

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
