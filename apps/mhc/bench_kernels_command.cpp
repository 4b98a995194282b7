// mhc bench kernels: per shape, forward and forward+backward median time of each CUDA mHC
// op and of one sublayer's whole mHC work, bytes moved, GB/s, the fraction of a
// device-to-device copy measured in the same run, and the speed-up over Megatron-core's
// figure. Prints a table, then one JSON line per row.
#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <string_view>

#include "apps/mhc/commands.h"
#include "core/error.h"

#if MHC_WITH_CUDA
#include "core/cuda/device.h"
#include "ops/cuda/linear.h"
#include "ops/cuda/mhc_mappings.h"
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

// Megatron-core's figures on an H100 (reference README), ms: fwd and fwd+bwd per op.
struct MegatronFigures {
  const char* shape;
  double mappings[2], aggregate[2], h_post_bda[2], sublayer_fwd_bwd;
};
constexpr MegatronFigures kMegatron[] = {
    {"8192,4,4,7168", {2.23, 13.27}, {0.76, 4.06}, {9.15, 22.15}, 34.14},
    {"1024,16,4,768", {2.07, 13.11}, {0.15, 0.63}, {0.66, 1.45}, 15.66},
    {"1024,16,4,1024", {1.75, 11.19}, {0.19, 0.63}, {0.85, 1.85}, 16.02},
};

int run_bench_kernels(const std::vector<std::string>& shapes, int repeats) {
  check(cuda::device_available(), "bench kernels: no CUDA device");
  cudaDeviceProp prop{};
  MHC_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s; times are medians of %d runs; bytes are what each op must move\n", prop.name, repeats);
  // The Megatron column divides figures of two cards when this one is not an H100.
  if (!std::string_view(prop.name).starts_with("NVIDIA H100"))
    std::printf(
        "note: Megatron's figures are from an H100 (3.02 TB/s copy); on this card the x Megatron column "
        "compares two cards\n");
  std::printf("%-15s %-16s %9s %9s %9s %8s %8s %10s\n", "shape", "op", "fwd ms", "f+b ms", "f+b GB", "GB/s",
              "of copy", "x Megatron");
  std::vector<nlohmann::json> rows;
  for (const std::string& text : shapes) {
    const KernelShape k = parse_shape(text);
    const int64_t tokens = k.s * k.b, n = k.n, C = k.C, streams = tokens * n * C, m = n * n + 2 * n;
    const int ni = static_cast<int>(n);
    check(cuda::stream_count_supported(ni), "--shape: n = " + std::to_string(n) + " has no kernel");
    const cuda::MappingsArgs args{tokens, ni, C, 20};
    DeviceBuffer<bf16> x(streams), out(streams), grad_out(streams), grad_x(streams), copy(streams);
    DeviceBuffer<bf16> y(tokens * C), bias(C), agg(tokens * C), grad_agg(tokens * C), grad_y(tokens * C);
    DeviceBuffer<float> weight(m * n * C), alpha(3), map_bias(m), proj(tokens * m), r(tokens), h_pre(tokens * n),
        h_post(tokens * n), h_res(tokens * n * n), grad_pre(tokens * n), grad_post(tokens * n),
        grad_res(tokens * n * n), grad_bias(C), grad_weight(m * n * C), grad_alpha(3), grad_map_bias(m),
        workspace(cuda::mappings_backward_workspace_floats(args)),
        forward_workspace(cuda::mappings_forward_workspace_floats(args));
    for (auto* b : {&x, &out, &grad_out, &grad_x, &y, &bias, &agg, &grad_agg}) b->fill_bytes(0x3C);  // ~0.011
    for (auto* b : {&weight, &alpha, &map_bias, &h_pre, &h_post, &h_res, &grad_pre, &grad_post, &grad_res})
      b->fill_bytes(0x3C);  // ~0.011 in fp32
    const double S = 2.0 * static_cast<double>(streams), R = 2.0 * static_cast<double>(tokens * C);
    const double copy_ms = median_ms(repeats, [&] {
      MHC_CUDA_CHECK(cudaMemcpyAsync(copy.data(), x.data(), static_cast<size_t>(S), cudaMemcpyDeviceToDevice));
    });
    const double copy_gbs = 2 * S / copy_ms / 1e6;
    const MegatronFigures* megatron = nullptr;
    for (const auto& f : kMegatron)
      if (text == f.shape) megatron = &f;

    // The mappings alone compute ||x||^2 (a pass over x); within the sublayer it comes from
    // the producer of x, the previous sublayer's h_post_bda forward, whose own output's
    // ||out||^2 is computed (and timed) in bda_fwd_chained: the work of each sublayer of a stack.
    DeviceBuffer<float> x_sumsq(tokens), out_sumsq(tokens), columns_workspace(cuda::column_sums_workspace_floats(tokens, C));
    cuda::row_sumsq(x.data(), tokens, n * C, x_sumsq.data());
    // with_agg: the aggregate made in the finish's pass; split: W's split made once for the
    // forward and the backward (the model's path)
    DeviceBuffer<bf16> weight_split(cuda::mappings_weight_split_elements(args));
    auto split_weight = [&] {
      const float* w = weight.data();
      bf16* split = weight_split.data();
      cuda::split_mappings_weights(args, &w, &split, 1);
    };
    auto mappings_fwd_given = [&](const float* given_sumsq, bf16* with_agg = nullptr, const bf16* split = nullptr) {
      cuda::mhc_mappings_forward(args, x.data(), given_sumsq, weight.data(), alpha.data(), map_bias.data(), proj.data(),
                                 r.data(), h_pre.data(), h_post.data(), h_res.data(), forward_workspace.data(), nullptr,
                                 split, with_agg);
    };
    auto mappings_fwd = [&] { mappings_fwd_given(nullptr); };
    // mix: dx written once with the stream mixing's and the aggregate's terms (the model's
    // path); split: W's split as the forward made it, or null
    auto mappings_bwd_with = [&](const cuda::StreamMixGrad* mix, const bf16* split) {
      cuda::mhc_mappings_backward(args, x.data(), weight.data(), alpha.data(), map_bias.data(), proj.data(), r.data(),
                                  h_pre.data(), h_post.data(), grad_pre.data(), grad_post.data(), grad_res.data(),
                                  grad_x.data(), grad_weight.data(), grad_alpha.data(), grad_map_bias.data(),
                                  workspace.data(), mix, nullptr, nullptr, split);
    };
    auto mappings_bwd = [&] { mappings_bwd_with(nullptr, nullptr); };
    auto aggregate_fwd = [&] { cuda::aggregate_forward(x.data(), h_pre.data(), tokens, ni, C, agg.data()); };
    auto aggregate_bwd = [&] {
      cuda::aggregate_backward(grad_agg.data(), x.data(), h_pre.data(), tokens, ni, C, grad_x.data(), grad_pre.data());
    };
    auto bda_fwd = [&] {
      cuda::h_post_bda_forward(x.data(), h_res.data(), h_post.data(), y.data(), bias.data(), tokens, ni, C, {},
                               out.data());
    };
    auto bda_fwd_chained = [&] {
      cuda::h_post_bda_forward(x.data(), h_res.data(), h_post.data(), y.data(), bias.data(), tokens, ni, C, {},
                               out.data(), out_sumsq.data());
    };
    auto bda_bwd = [&] {
      cuda::h_post_bda_backward(grad_out.data(), x.data(), h_res.data(), h_post.data(), y.data(), bias.data(), tokens,
                                ni, C, {}, grad_x.data(), grad_res.data(), grad_post.data(), grad_y.data());
      cuda::accumulate_column_sums(grad_y.data(), tokens, C, grad_bias.data(), columns_workspace.data());
    };
    struct Op {
      const char* name;
      std::function<void()> fwd, bwd;
      double bytes;  // forward + backward
      double megatron_fwd, megatron_fwd_bwd;
    };
    const std::vector<Op> ops = {
        // fwd reads x; bwd reads x and accumulates into dx
        {"mappings", mappings_fwd, mappings_bwd, 4 * S, megatron ? megatron->mappings[0] : 0,
         megatron ? megatron->mappings[1] : 0},
        // fwd reads x, writes agg; bwd reads dagg and x, accumulates into dx
        {"aggregate", aggregate_fwd, aggregate_bwd, 4 * S + 2 * R, megatron ? megatron->aggregate[0] : 0,
         megatron ? megatron->aggregate[1] : 0},
        // fwd reads x, y, writes out; bwd reads dout, x, y, writes dx, dy
        {"h_post_bda", bda_fwd, bda_bwd, 5 * S + 3 * R, megatron ? megatron->h_post_bda[0] : 0,
         megatron ? megatron->h_post_bda[1] : 0},
        // block entry and exit: expand reads e, writes x; contract reads x, writes out; backward alike
        {"expand+contract",
         [&] {
           cuda::stream_expand_forward(y.data(), tokens, ni, C, out.data());
           cuda::stream_contract_forward(x.data(), tokens, ni, C, agg.data());
         },
         [&] {
           cuda::stream_contract_backward(grad_agg.data(), tokens, ni, C, grad_x.data());
           cuda::stream_expand_backward(grad_out.data(), tokens, ni, C, grad_y.data());
         },
         4 * S + 4 * R, 0, 0},
        // W split once for both passes, the three forward (the aggregate in the mappings'
        // finish), then h_post_bda's backward fused with the aggregate's (reads
        // dout, x, dagg, y; writes dy and the per-token reductions), dy_bias, then the
        // mappings' backward writing all of dx once (reads x, dout, dagg). (In a model dy
        // is needed before the sublayer's backward, so it comes from the mappings' backward
        // of the sublayer above instead: NextGradY.)
        {"sublayer (all 3)",
         [&] {
           split_weight();
           mappings_fwd_given(x_sumsq.data(), agg.data(), weight_split.data());
           bda_fwd_chained();
         },
         [&] {
           const cuda::AggregateGrad aggregate{grad_agg.data(), h_pre.data(), grad_pre.data()};
           cuda::h_post_bda_backward(grad_out.data(), x.data(), h_res.data(), h_post.data(), y.data(), bias.data(),
                                     tokens, ni, C, {}, nullptr, grad_res.data(), grad_post.data(), grad_y.data(),
                                     &aggregate);
           cuda::accumulate_column_sums(grad_y.data(), tokens, C, grad_bias.data(), columns_workspace.data());
           const cuda::StreamMixGrad mix{grad_out.data(), h_res.data(), grad_agg.data()};
           mappings_bwd_with(&mix, weight_split.data());
         },
         10 * S + 5 * R, 0, megatron ? megatron->sublayer_fwd_bwd : 0},
    };
    std::printf("%-15s %-16s %9s %9.3f %9.2f %8.0f %7.0f%%\n", text.c_str(), "d2d copy", "", copy_ms, 2 * S / 1e9,
                copy_gbs, 100.0);
    for (const Op& op : ops) {
      const double fwd_ms = median_ms(repeats, op.fwd);
      const double both_ms = median_ms(repeats, [&] {
        op.fwd();
        op.bwd();
      });
      const double gbs = op.bytes / both_ms / 1e6;
      const double speedup = op.megatron_fwd_bwd > 0 ? op.megatron_fwd_bwd / both_ms : 0;
      std::printf("%-15s %-16s %9.3f %9.3f %9.2f %8.0f %7.0f%% %10s\n", text.c_str(), op.name, fwd_ms, both_ms,
                  op.bytes / 1e9, gbs, 100 * gbs / copy_gbs,
                  speedup > 0 ? (std::to_string(speedup).substr(0, 5) + "x").c_str() : "-");
      rows.push_back({{"shape", text},
                      {"op", op.name},
                      {"fwd_ms", fwd_ms},
                      {"fwd_bwd_ms", both_ms},
                      {"bytes", op.bytes},
                      {"gb_per_s", gbs},
                      {"fraction_of_copy", gbs / copy_gbs},
                      {"copy_gb_per_s", copy_gbs},
                      {"megatron_fwd_bwd_ms", op.megatron_fwd_bwd},
                      {"speedup_vs_megatron", speedup},
                      {"device", prop.name}});
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
      "Per shape s,b,n,C: forward and forward+backward median time of each mHC op (mappings, aggregate, fused "
      "h_post_bda) and of one whole sublayer's mHC work, the bytes each must move, GB/s, the fraction of a "
      "device-to-device copy measured in the same run, and the speed-up over Megatron-core's figure for that shape. "
      "Needs a CUDA build and a GPU.");
  cmd->add_option("--shape", *shapes, "shapes s,b,n,C (repeatable)")->capture_default_str();
  cmd->add_option("--repeats", *repeats, "timed repetitions (median reported)")
      ->check(at_least(1, true))
      ->capture_default_str();
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
