// Parity with Megatron-core's own module on every reference file in tests/data
// (copied from shared/reference/megatron-mhc), in double and in float.
#include <gtest/gtest.h>

#include <filesystem>

#include "check/parity.h"
#include "core/error.h"

namespace mhc {
namespace {

std::vector<std::string> reference_files() {
  std::vector<std::string> files;
  for (const auto& entry : std::filesystem::directory_iterator(MHC_TEST_DATA_DIR))
    if (entry.path().extension() == ".safetensors") files.push_back(entry.path().string());
  std::sort(files.begin(), files.end());
  return files;
}

TEST(Parity, ReferenceFilesArePresent) { EXPECT_GE(reference_files().size(), 4u); }

TEST(Parity, EveryReferenceFileInDouble) {
  for (const std::string& path : reference_files()) {
    const ParityResult result = check_parity<double>(read_safetensors(path), path);
    EXPECT_LT(result.worst().error, 1e-10) << path << " worst in " << result.worst().name;
    EXPECT_GE(result.errors.size(), 2u) << path;
    EXPECT_TRUE(result.ignored.empty()) << path;
  }
}

TEST(Parity, EveryReferenceFileInFloat) {
  for (const std::string& path : reference_files()) {
    const ParityResult result = check_parity<float>(read_safetensors(path), path);
    EXPECT_LT(result.worst().error, 1e-5) << path << " worst in " << result.worst().name;
  }
}

TEST(Parity, HyperConnectionFilesCheckEveryGradient) {
  const std::string path = std::string(MHC_TEST_DATA_DIR) + "/default_init.safetensors";
  const ParityResult result = check_parity<double>(read_safetensors(path), path);
  std::set<std::string> names;
  for (const auto& e : result.errors) names.insert(e.name);
  for (const char* expected : {"h_pre", "h_post", "h_res", "aggregated", "out", "grad.x", "grad.y", "grad.y_bias",
                               "grad.mapping_proj.weight", "grad.alpha_pre", "grad.alpha_post", "grad.alpha_res",
                               "grad.bias"})
    EXPECT_TRUE(names.count(expected)) << expected;
}

TEST(Parity, APerturbedReferenceIsDetected) {
  const std::string path = std::string(MHC_TEST_DATA_DIR) + "/random_gates.safetensors";
  Safetensors file = read_safetensors(path);
  auto values = file.at("grad.mapping_proj.weight").to_vector<double>();
  values[17] *= 1.0 + 1e-6;
  file.tensors["grad.mapping_proj.weight"] =
      HostTensor::from_values<double>(DType::F64, file.at("grad.mapping_proj.weight").shape, values);
  const ParityResult result = check_parity<double>(file, "perturbed");
  EXPECT_EQ(result.worst().name, "grad.mapping_proj.weight");
  EXPECT_GT(result.worst().error, 1e-10);
}

TEST(Parity, UnusableFilesAreErrors) {
  const std::string path = std::string(MHC_TEST_DATA_DIR) + "/n2_iters10.safetensors";
  Safetensors no_kind = read_safetensors(path);
  no_kind.metadata.erase("kind");
  EXPECT_THROW(check_parity<double>(no_kind, "no kind"), Error);
  Safetensors wrong_shape = read_safetensors(path);
  wrong_shape.tensors["y"] = HostTensor::from_values<double>(DType::F64, {3}, {1, 2, 3});
  EXPECT_THROW(check_parity<double>(wrong_shape, "wrong shape"), Error);
  Safetensors missing = read_safetensors(path);
  missing.tensors.erase("g_out");
  EXPECT_THROW(check_parity<double>(missing, "missing g_out"), Error);
}

}  // namespace
}  // namespace mhc
