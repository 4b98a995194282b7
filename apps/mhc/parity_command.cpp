// mhc parity FILE_OR_DIR...: recompute Megatron reference files and report the worst error.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "apps/mhc/commands.h"
#include "check/parity.h"
#include "core/error.h"

namespace mhc::app {

namespace {

struct ParityOptions {
  std::vector<std::string> files;
  std::string dtype = "double";
  bool verbose = false;
};

// The files to check: each argument, a directory standing for the .safetensors files under
// it (in name order). A directory without any is an error (nothing would be checked).
std::vector<std::string> reference_files(const std::vector<std::string>& arguments) {
  namespace fs = std::filesystem;
  std::vector<std::string> files;
  for (const std::string& argument : arguments) {
    std::error_code error;
    if (!fs::is_directory(argument, error)) {
      files.push_back(argument);
      continue;
    }
    std::vector<std::string> found;
    for (const fs::directory_entry& entry : fs::recursive_directory_iterator(argument, error))
      if (entry.is_regular_file(error) && entry.path().extension() == ".safetensors") found.push_back(entry.path());
    check(!error, argument + ": cannot list: " + error.message());
    check(!found.empty(), argument + ": a directory without .safetensors files");
    std::sort(found.begin(), found.end());
    files.insert(files.end(), found.begin(), found.end());
  }
  return files;
}

int run_parity(const ParityOptions& options) {
  const bool use_float = options.dtype == "float";
  const double tolerance = use_float ? 1e-5 : 1e-10;
  const std::vector<std::string> files = reference_files(options.files);  // errors: main's exit 2
  int exit_code = 0;
  for (const std::string& path : files) {
    try {
      const Safetensors file = read_safetensors(path);
      const ParityResult result = use_float ? check_parity<float>(file, path) : check_parity<double>(file, path);
      const TensorError& worst = result.worst();
      const bool ok = worst.error <= tolerance;
      std::printf("%-50s %-16s worst %s error %.3e in %-26s %s\n", path.c_str(), result.kind.c_str(),
                  worst.relative ? "relative" : "absolute", worst.error, worst.name.c_str(), ok ? "ok" : "FAIL");
      if (options.verbose)
        for (const TensorError& e : result.errors)
          std::printf("    %-28s %s %.3e\n", e.name.c_str(), e.relative ? "rel" : "abs", e.error);
      for (const std::string& name : result.ignored)
        std::fprintf(stderr, "mhc parity: %s: tensor '%s' is not an input or output of kind %s; not checked\n",
                     path.c_str(), name.c_str(), result.kind.c_str());
      if (!ok && exit_code == 0) exit_code = 1;
    } catch (const Error& e) {
      std::fprintf(stderr, "mhc parity: %s\n", e.what());
      exit_code = 2;
    }
  }
  std::printf("%zu file(s), dtype %s, tolerance %.0e: %s\n", files.size(), options.dtype.c_str(), tolerance,
              exit_code == 0   ? "all within tolerance"
              : exit_code == 1 ? "FAILED"
                               : "unreadable file(s)");
  return exit_code;
}

}  // namespace

Command add_parity_command(CLI::App& app) {
  auto options = std::make_shared<ParityOptions>();
  CLI::App* cmd = app.add_subcommand(
      "parity",
      "Recompute Megatron-core reference files (kinds hyper_connection and sinkhorn) and print, per file, the "
      "worst relative error ||ours-ref||/||ref|| over every output and gradient (absolute where the reference is "
      "all zeros). A directory stands for the .safetensors files under it. Exit 0 when all are within tolerance "
      "(1e-10 double, 1e-5 float), 1 otherwise, 2 when a file cannot be read.");
  cmd->add_option("files", options->files, "reference .safetensors files, or directories holding them")->required();
  cmd->add_option("--dtype", options->dtype, "compute precision")
      ->check(CLI::IsMember({"double", "float"}))
      ->capture_default_str();
  cmd->add_flag("-v,--verbose", options->verbose, "print the error of every tensor");
  return [cmd, options] { return cmd->parsed() ? run_parity(*options) : -1; };
}

}  // namespace mhc::app
