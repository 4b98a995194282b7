// The `mhc` command: one binary, one subcommand per job.
#include <cstdio>
#include <exception>
#include <vector>

#include "apps/mhc/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"mhc: transformer language models with Manifold-Constrained Hyper-Connections (mHC)"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Expand all help");
  std::vector<mhc::app::Command> commands = {mhc::app::add_train_command(app), mhc::app::add_eval_command(app),
                                             mhc::app::add_generate_command(app), mhc::app::add_report_command(app)};
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks (see each one's --help)");
  bench->require_subcommand(1);
  const std::vector<mhc::app::Command> more = {mhc::app::add_parity_command(app),
                                                    mhc::app::add_check_grad_command(app),
                                                    mhc::app::add_bench_memory_command(*bench),
                                                    mhc::app::add_bench_kernels_command(*bench),
                                                    mhc::app::add_bench_train_command(*bench)};
  commands.insert(commands.end(), more.begin(), more.end());
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  try {
    for (const auto& command : commands) {
      const int code = command();
      if (code >= 0) return code;
    }
  } catch (const std::exception& e) {  // mhc::Error, and the library's own (filesystem, allocation)
    std::fprintf(stderr, "mhc: error: %s\n", e.what());
    return 2;
  }
  return 2;
}
