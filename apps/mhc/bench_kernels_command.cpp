// mhc bench kernels: median time, bytes moved, achieved GB/s and the fraction of a
// device-to-device copy (measured in the same run) of each CUDA mHC kernel that exists so
// far, at the shapes of the reference figures. Prints a table, then one JSON line per row.
#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "apps/mhc/commands.h"
#include "core/error.h"

#if MHC_WITH_CUDA
#include "core/cuda/device.h"
#include "ops/cuda/stream_mix.h"
#endif

namespace mhc::app {

namespace {

struct KernelShape {
  int64_t s, b, n, C;
};

KernelShape parse_shape(const std::string& text) {
  KernelShape k{};
  char sep[3];
  std::istringstream in(text);
  in >> k.s >> sep[0] >> k.b >> sep[1] >> k.n >> sep[2] >> k.C;
  check(in && !in.rdbuf()->in_avail() && sep[0] == ',' && sep[1] == ',' && sep[2] == ',' && k.s > 0 && k.b > 0 &&
            k.n > 0 && k.C > 0,
        "--shape: '" + text + "' is not s,b,n,C with positive integers");
  return k;
}

#if MHC_WITH_CUDA
using cuda::bf16;
using cuda::DeviceBuffer;

template <typename Body> double median_ms(int repeats, Body&& body) {
  cudaEvent_t start, stop;
  MHC_CUDA_CHECK(cudaEventCreate(&start));
  MHC_CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) body();  // warm-up
  std::vector<float> times;
  for (int i = 0; i < repeats; ++i) {
    MHC_CUDA_CHECK(cudaEventRecord(start));
    body();
    MHC_CUDA_CHECK(cudaEventRecord(stop));
    MHC_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    MHC_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

int run_bench_kernels(const std::vector<std::string>& shapes, int repeats) {
  check(cuda::device_available(), "bench kernels: no CUDA device");
  cudaDeviceProp prop{};
  MHC_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s\n", prop.name);
  std::printf("%-16s %-18s %10s %10s %9s %8s\n", "shape", "op", "ms", "MB", "GB/s", "of copy");
  std::vector<nlohmann::json> rows;
  for (const std::string& text : shapes) {
    const KernelShape k = parse_shape(text);
    const int64_t tokens = k.s * k.b, n = k.n, C = k.C, streams = tokens * n * C;
    check(cuda::stream_count_supported(static_cast<int>(n)), "--shape: n = " + std::to_string(n) + " has no kernel");
    DeviceBuffer<bf16> x(streams), out(streams), grad_out(streams), grad_x(streams), copy(streams);
    DeviceBuffer<bf16> y(tokens * C), bias(C), agg(tokens * C), grad_agg(tokens * C), grad_y(tokens * C);
    DeviceBuffer<float> h_pre(tokens * n), h_post(tokens * n), h_res(tokens * n * n), grad_pre(tokens * n),
        grad_post(tokens * n), grad_res(tokens * n * n), grad_bias(C);
    for (auto* b : {&x, &out, &grad_out, &grad_x}) b->fill_bytes(0x3C);  // small finite bf16 values
    for (auto* b : {&y, &bias, &agg, &grad_agg}) b->fill_bytes(0x3C);
    for (auto* b : {&h_pre, &h_post, &h_res, &grad_bias}) b->fill_bytes(0x3C);
    const double stream_bytes = 2.0 * static_cast<double>(streams), row_bytes = 2.0 * static_cast<double>(tokens * C);
    const int ni = static_cast<int>(n);
    const double copy_ms = median_ms(repeats, [&] {
      MHC_CUDA_CHECK(cudaMemcpyAsync(copy.data(), x.data(), static_cast<size_t>(stream_bytes), cudaMemcpyDeviceToDevice));
    });
    const double copy_gbs = 2 * stream_bytes / copy_ms / 1e6;
    struct Op {
      const char* name;
      double bytes;
      std::function<void()> run;
    };
    const std::vector<Op> ops = {
        {"d2d copy", 2 * stream_bytes, [&] {
           MHC_CUDA_CHECK(cudaMemcpyAsync(copy.data(), x.data(), static_cast<size_t>(stream_bytes),
                                          cudaMemcpyDeviceToDevice));
         }},
        {"aggregate fwd", stream_bytes + row_bytes,
         [&] { cuda::aggregate_forward(x.data(), h_pre.data(), tokens, ni, C, agg.data()); }},
        {"aggregate bwd", 3 * stream_bytes + row_bytes,
         [&] {
           cuda::aggregate_backward(grad_agg.data(), x.data(), h_pre.data(), tokens, ni, C, grad_x.data(),
                                    grad_pre.data());
         }},
        {"h_post_bda fwd", 2 * stream_bytes + row_bytes,
         [&] {
           cuda::h_post_bda_forward(x.data(), h_res.data(), h_post.data(), y.data(), bias.data(), tokens, ni, C, {},
                                    out.data());
         }},
        {"h_post_bda bwd", 3 * stream_bytes + 3 * row_bytes,
         [&] {
           cuda::h_post_bda_backward(grad_out.data(), x.data(), h_res.data(), h_post.data(), y.data(), bias.data(),
                                     tokens, ni, C, {}, grad_x.data(), grad_res.data(), grad_post.data(),
                                     grad_y.data(), grad_bias.data());
         }},
    };
    for (const Op& op : ops) {
      const double ms = op.name == std::string("d2d copy") ? copy_ms : median_ms(repeats, op.run);
      const double gbs = op.bytes / ms / 1e6;
      std::printf("%-16s %-18s %10.3f %10.1f %9.0f %7.0f%%\n", text.c_str(), op.name, ms, op.bytes / 1e6, gbs,
                  100 * gbs / copy_gbs);
      rows.push_back({{"shape", text}, {"op", op.name}, {"ms", ms}, {"bytes", op.bytes}, {"gb_per_s", gbs},
                      {"fraction_of_copy", gbs / copy_gbs}, {"device", prop.name}});
    }
  }
  for (const auto& r : rows) std::printf("%s\n", r.dump().c_str());
  return 0;
}
#endif

}  // namespace

Command add_bench_kernels_command(CLI::App& bench) {
  auto shapes = std::make_shared<std::vector<std::string>>(
      std::vector<std::string>{"8192,4,4,7168", "1024,16,4,768", "1024,16,4,1024"});
  auto repeats = std::make_shared<int>(20);
  CLI::App* cmd = bench.add_subcommand(
      "kernels",
      "Median time, bytes, GB/s and fraction of a device-to-device copy of each CUDA mHC kernel built so far "
      "(aggregate, fused h_post_bda; forward and backward), per shape s,b,n,C. Needs a CUDA build and a GPU.");
  cmd->add_option("--shape", *shapes, "shapes s,b,n,C (repeatable)")->capture_default_str();
  cmd->add_option("--repeats", *repeats, "timed repetitions (median reported)")->check(CLI::PositiveNumber)->capture_default_str();
  return [cmd, shapes, repeats]() -> int {
    if (!cmd->parsed()) return -1;
    for (const std::string& s : *shapes) parse_shape(s);
#if MHC_WITH_CUDA
    return run_bench_kernels(*shapes, *repeats);
#else
    (void)repeats;
    fail("bench kernels: this mhc was built without CUDA (no nvcc at configure time, or -DMHC_CUDA=OFF)");
#endif
  };
}

}  // namespace mhc::app
