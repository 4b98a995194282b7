#include "nn/gpt_cuda.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/cuda/device.h"
#include "core/error.h"
#include "nn/recompute_plan.h"
#include "ops/cuda/activation.h"
#include "ops/cuda/adamw.h"
#include "ops/cuda/attention.h"
#include "ops/cuda/dropout_keys.h"
#include "ops/cuda/embedding.h"
#include "ops/cuda/gains.h"
#include "ops/cuda/gemm.h"
#include "ops/cuda/linear.h"
#include "ops/cuda/mhc_mappings.h"
#include "ops/cuda/norm.h"
#include "ops/cuda/stream_mix.h"
#include "train/optimizer.h"

namespace mhc {

using cuda::bf16;
using cuda::DeviceBuffer;

namespace {

// Where a host parameter lives in the device arenas (offsets in elements).
struct Slot {
  Parameter<float>* host;
  int64_t offset;
  int64_t size() const { return host->size(); }
};

// Gradients that the products write whole (the linear layers' dW through cuBLASLt, the
// head's dwte): a step's first micro-batch writes them instead of adding (beta 0), so
// zero_grad leaves them alone and zeroes only the rest ([products_end, count)).
bool written_by_products(const std::string& name) {
  for (const char* layer : {".linear_qkv.weight", ".linear_proj.weight", ".linear_fc1.weight", ".linear_fc2.weight"})
    if (name.ends_with(layer)) return true;
  return name == "embedding.word_embeddings.weight";
}

// The mappings of one hyper connection, kept from forward to backward.
struct HcState {
  Slot weight, alpha, bias;  // alpha: the three gates, consecutive
  DeviceBuffer<float> proj, r, h_pre, h_post, h_res;
  DeviceBuffer<float> input_sumsq;  // ||x||^2 of each token's input row, from its producer
  DeviceBuffer<bf16> weight_split;  // W's bf16 parts, made at the start of each forward
  Slot sublayer_bias;               // the sublayer's output bias: its gradient is dy's column sums
  bool grad_y_written = false;      // dy (and its bias gradient) written by the backward above
};

struct CudaLayer : RestorableTensors<bf16> {
  Slot ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b;
  HcState hc_attn, hc_mlp;
  DeviceBuffer<float> ln1_mean, ln1_rstd, ln2_mean, ln2_rstd, lse;
  DeviceBuffer<bf16> qkv, ctx, attn_y, fc, act, mlp_y;
  DeviceBuffer<uint32_t> keep_mask;  // attention dropout's mask from the forward, as bits (or empty)
  // the residual dropouts' masks, as bits, from the forward (DropoutSpec::kept; or empty)
  DeviceBuffer<uint8_t> kept_attn, kept_mlp;
  // The tensors selective recompute discards: in `own`, or in the layer's slot of the
  // recompute workspace (then `own` holds only x_out at a block's end).
  DeviceBuffer<bf16> own;
  cpu::DropoutSpec drop_attn, drop_mlp, drop_probs;
};

}  // namespace

struct GptCuda::State {
  // Every launch of the model but the side stream's (below) goes on it. High priority:
  // where blocks of both wait, its own (the step's critical path) are scheduled first.
  cuda::Stream stream_owner{cuda::Stream::kHigh};
  cudaStream_t stream = stream_owner.get();
  // A training micro-batch (forward, head and backward) as one CUDA graph, replayed while
  // nothing in it changes from one micro-batch to the next: the dropout keys, which change
  // every step, are made in it from the step in device memory (dropout_step, uploaded
  // before each replay). Captured at the second micro-batch (the first makes cuBLASLt's
  // plans and sets the kernels' attributes); one graph for a step's first micro-batch,
  // which writes the products' weight gradients, one for the others, which add to them.
  cuda::Graph train_graph[2];
  bool graphs = true, warmed_up = false;
  // Until the first backward after zero_grad: the products' weight gradients are written,
  // not added (their part of the arena is not zeroed).
  bool grads_fresh = true;
  // The backward's weight gradients (the layers' dW, qkv's db, the pre-norms' weight and
  // bias gradients from the sums the reductions' pass made, the mappings' parameter sums)
  // run on a side stream, beside the rest of the backward on `stream`: no later launch
  // needs them before the optimizer. Each kind's latest one has an event, which the main
  // stream waits for before it overwrites what that launch reads.
  enum WeightGrad { kFc2, kFc1, kLn2, kProj, kQkv, kLn1, kMappings, kWeightGrads };
  bool overlap = true;
  cuda::Stream side_owner;
  cudaStream_t side = side_owner.get();
  // The cuBLASLt workspaces of the two streams: the model's products never share one with
  // another stream's that may run at the same time (its other stream's, another model's).
  cuda::StreamGemmWorkspace gemm_ws{stream}, side_gemm_ws{side};
  cuda::Event side_fork, side_done[kWeightGrads];
  bool side_pending[kWeightGrads] = {};
  DeviceBuffer<float> side_columns_ws;
  int64_t B, S, N, C, n, F, width, V, H, head_rows;
  bool hc, rms, recompute;
  bool aggregates_kept;  // the layers' agg1 and agg2 (see the constructor)
  RecomputePlan plan;
  DeviceBuffer<bf16> workspace;  // the restorable tensors of one recompute block
  cpu::Activation activation;
  float eps;
  uint64_t seed = 0;
  int64_t steps_taken = 0;
  std::unique_ptr<Gpt<float>> host;  // parameters and their initialisation
  std::vector<Slot> slots;           // in host parameter order
  int64_t parameter_count = 0, decay_end = 0;  // [0, decay_end): the parameters with weight decay
  int64_t products_end = 0;                     // [0, products_end): written_by_products
  DeviceBuffer<float> value, grad, exp_avg, exp_avg_sq;
  DeviceBuffer<bf16> half;  // bf16 copies of the values, for the products
  Slot wte, wpe, lnf_w, lnf_b;
  std::vector<CudaLayer> layers;
  DeviceBuffer<int32_t> tokens, targets;
  // The training step's dropout keys, [layer][DropoutSite], made on the device from the step.
  DeviceBuffer<uint64_t> dropout_step, dropout_keys;
  DeviceBuffer<bf16> e, x0, h, hf, logits;
  DeviceBuffer<float> lnf_mean, lnf_rstd, losses, ones;
  // The host side of a micro-batch, in page-locked memory, so that its copies run on the
  // stream without the host waiting: its tokens, targets and step (the caller's arrays may
  // be gone before the copies run), and its per-row losses, copied back behind its backward
  // and read after the step's one wait (micro_batch_losses()). Slot k is micro-batch k of a
  // step (zero_grad() starts again at 0); the host rewrites a slot's inputs only once its
  // last uploads are done.
  struct HostSlot {
    explicit HostSlot(int64_t N)
        : tokens(static_cast<size_t>(N)), targets(static_cast<size_t>(N)), step(1), losses(static_cast<size_t>(N)) {}
    cuda::HostBuffer<int32_t> tokens, targets;
    cuda::HostBuffer<uint64_t> step;
    cuda::HostBuffer<float> losses;
    cuda::Event uploaded;
  };
  std::vector<std::unique_ptr<HostSlot>> host_slots;
  size_t micro_batches = 0;  // forward_backward() calls since zero_grad()
  HostSlot& host_slot(size_t k) {
    while (host_slots.size() <= k) host_slots.push_back(std::make_unique<HostSlot>(N));
    return *host_slots[k];
  }
  DeviceBuffer<bf16> dx_a, dx_b, dx_mid, dagg, dln, dy, dctx, dh, dhf, de, dqkv, dfc, dact;
  DeviceBuffer<float> grad_h_pre, grad_h_post, grad_h_res;
  DeviceBuffer<float> mappings_forward_ws, mappings_backward_ws, columns_ws, norm_result;
  // The pre-norms' weight and bias gradient sums made in the reductions' pass (ln1, ln2),
  // added to the gradients on the side stream.
  DeviceBuffer<float> norm_param_partials[2];
  DeviceBuffer<double> norm_ws;
  DeviceBuffer<const float*> module_h_res;  // every hyper connection's H_res, forward order
  DeviceBuffer<float> gains_ws, gains_stats;
  DeviceBuffer<unsigned char> attention_ws, embedding_ws;

  float* value_of(const Slot& s) { return s.host->value.empty() ? nullptr : value.data() + s.offset; }
  float* grad_of(const Slot& s) { return s.host->value.empty() ? nullptr : grad.data() + s.offset; }
  bf16* half_of(const Slot& s) { return s.host->value.empty() ? nullptr : half.data() + s.offset; }
  Slot slot_of(const Parameter<float>& p) const {
    for (const Slot& s : slots)
      if (s.host == &p) return s;
    fail("GptCuda: parameter " + p.name + " has no device slot");
  }
  cuda::MappingsArgs mappings_args(const ModelConfig& c) const {
    return {N, static_cast<int>(n), C,
            c.connection == "mhc" ? static_cast<int>(c.mhc_sinkhorn_iterations) : 0};
  }

  void norm(const bf16* x, const Slot& w, const Slot& b, bf16* out, float* mean, float* rstd) {
    cuda::norm_forward(x, value_of(w), value_of(b), N, C, eps, rms, out, mean, rstd, stream);
  }
  // `launch(stream, column_sums_workspace)`: on the side stream after what `stream` has
  // queued so far, or on `stream` itself without overlap.
  template <typename Launch> void weight_grad(WeightGrad kind, const Launch& launch) {
    if (!overlap) {
      launch(stream, columns_ws.data());
      return;
    }
    side_fork.record(stream);
    side_fork.wait_on(side);
    launch(side, side_columns_ws.data());
    side_done[kind].record(side);
    side_pending[kind] = true;
  }
  // dW += x^T dy (and db += dy's column sums) of a [N, in] -> [N, out] layer.
  void linear_weight_grad(WeightGrad kind, const bf16* grad_y, const bf16* x, int64_t in, int64_t out,
                          const Slot& w, const Slot* b) {
    weight_grad(kind, [&](cudaStream_t on, float* columns) {
      cuda::linear_backward_weight(grad_y, x, N, in, out, grad_of(w), b ? grad_of(*b) : nullptr, columns, on,
                                   /*accumulate=*/!grads_fresh);
    });
  }
  // `stream` waits for the latest weight gradient of that kind (before it overwrites its
  // inputs); await_weight_grads(): for all of them (also joins the side stream's work).
  void await_weight_grad(WeightGrad kind) {
    if (!side_pending[kind]) return;
    side_done[kind].wait_on(stream);
    side_pending[kind] = false;
  }
  void await_weight_grads() {
    for (int k = 0; k < kWeightGrads; ++k) await_weight_grad(static_cast<WeightGrad>(k));
  }

  // dx += the norm's input gradient (accumulate), else dx = it; the weight and bias
  // gradients accumulate, and dx_sums (may be null) the column sums of dx as read.
  void norm_backward(const bf16* g, const bf16* x, const Slot& w, const Slot& b, const float* mean, const float* rstd,
                     bf16* dx, bool accumulate, float* dx_sums = nullptr) {
    cuda::norm_backward(g, x, value_of(w), mean, rstd, N, C, rms, dx, grad_of(w), grad_of(b), columns_ws.data(),
                        accumulate, stream, dx_sums);
  }
  // H_res/H_post mixing and the bias-dropout-add; residual models are the n = 1 case with
  // H_res = H_post = 1.
  // out_sumsq (may be null): ||out||^2 per token, for the next hyper connection's mappings.
  void residual_forward(const HcState& m, const bf16* x, const bf16* y, const Slot& bias, cpu::DropoutSpec d,
                        bf16* out, float* out_sumsq = nullptr) {
    cuda::h_post_bda_forward(x, hc ? m.h_res.data() : ones.data(), hc ? m.h_post.data() : ones.data(), y,
                             half_of(bias), N, static_cast<int>(n), C, d, out, out_sumsq, stream);
  }
  // A plain residual without dropout: out = x + y + bias, in the output product's epilogue.
  bool residual_add_in_epilogue(cpu::DropoutSpec d) const { return !hc && d.p <= 0.0f; }
  // Where its bias gradient (dout's column sums) is made by the next pre-norm backward, which
  // reads dout as the dx it adds to: there the bias's gradient, else null.
  float* output_bias_grad(const Slot& bias, cpu::DropoutSpec d) {
    return residual_add_in_epilogue(d) ? grad_of(bias) : nullptr;
  }
  // The sublayer's output product, then the hyper connection (or residual) forward:
  // y = in W^T, out = the bias-dropout-add of y onto x.
  void sublayer_output(HcState& m, const bf16* in, int64_t in_features, const Slot& weight, const Slot& bias,
                       const bf16* x, cpu::DropoutSpec d, bf16* y, bf16* out, float* out_sumsq) {
    if (residual_add_in_epilogue(d)) {
      cuda::linear_forward(in, half_of(weight), half_of(bias), N, in_features, C, out, stream, x);
      return;
    }
    cuda::linear_forward(in, half_of(weight), nullptr, N, in_features, C, y, stream);
    residual_forward(m, x, y, bias, d, out, out_sumsq);
  }
  // The sublayer's gradient dy (and its bias's), before the sublayer's backward; returns
  // where dy is. A plain residual passes dout through unchanged (dy is dout itself without
  // dropout; layer_backward accumulates in place, and the bias gradient is made by the
  // pre-norm's backward below, which reads that dout as the dx it adds to:
  // output_bias_grad); hyper connections get the rest of their backward in hc_backward,
  // once the aggregate's gradient exists.
  const bf16* residual_backward(HcState& m, const bf16* grad_out, const Slot& bias, cpu::DropoutSpec d) {
    if (residual_add_in_epilogue(d)) return grad_out;
    if (m.grad_y_written) {  // by the mappings' backward of the hyper connection above, with dy_bias
      m.grad_y_written = false;
      return dy.data();
    }
    cuda::h_post_bda_grad_y(grad_out, hc ? m.h_post.data() : ones.data(), N, static_cast<int>(n), C, d, dy.data(),
                            grad_of(bias), columns_ws.data(), stream);
    return dy.data();
  }
  // After the sublayer's backward: dH_res, dH_post and dH_pre in one kernel, then the
  // mappings' backward, which writes all of grad_x (H_res^T dout + H_pre dagg + its own
  // terms) once; the mapping parameters' gradients accumulate. `below` (with its dropout):
  // the hyper connection whose dout grad_x is, or null; without dropout its dy is written
  // from grad_x while on chip.
  // norm: where dagg is the pre-norm's input gradient made in the reductions' pass, else null.
  void hc_backward(HcState& m, const bf16* grad_out, const bf16* x, const bf16* y, const Slot& bias,
                   cpu::DropoutSpec d, const bf16* grad_agg, bf16* grad_x, HcState* below,
                   cpu::DropoutSpec below_dropout, const ModelConfig& c, const cuda::NormInputGrad* norm) {
    const cuda::AggregateGrad aggregate{grad_agg, m.h_pre.data(), grad_h_pre.data(), norm};
    cuda::h_post_bda_backward(grad_out, x, m.h_res.data(), m.h_post.data(), y, half_of(bias), N,
                              static_cast<int>(n), C, d, /*grad_x, written by the mappings:*/ nullptr,
                              grad_h_res.data(), grad_h_post.data(),
                              /*grad_y, written before the sublayer's backward:*/ nullptr, &aggregate, stream);
    const cuda::StreamMixGrad mix{grad_out, m.h_res.data(), grad_agg};
    const bool write_dy = below && below_dropout.p <= 0.0f && cuda::next_grad_y_supported(mappings_args(c));
    const cuda::NextGradY next{below ? below->h_post.data() : nullptr, dy.data(),
                               below ? grad_of(below->sublayer_bias) : nullptr};
    await_weight_grad(kMappings);  // the previous hyper connection's, which reads the workspace
    cuda::mhc_mappings_backward(mappings_args(c), x, value_of(m.weight), value_of(m.alpha), value_of(m.bias),
                                m.proj.data(), m.r.data(), m.h_pre.data(), m.h_post.data(), grad_h_pre.data(),
                                grad_h_post.data(), grad_h_res.data(), grad_x, grad_of(m.weight), grad_of(m.alpha),
                                grad_of(m.bias), mappings_backward_ws.data(), &mix, write_dy ? &next : nullptr,
                                stream, m.weight_split.data(), /*sums_later=*/true);
    weight_grad(kMappings, [&](cudaStream_t on, float*) {
      cuda::mhc_mappings_backward_sums(mappings_args(c), grad_of(m.weight), grad_of(m.alpha), grad_of(m.bias),
                                       write_dy ? next.grad_y_bias : nullptr, mappings_backward_ws.data(), on);
    });
    if (write_dy) below->grad_y_written = true;
  }
  // The sublayer's pre-norm backward (dln -> dagg), then the hyper connection's. Where the
  // kernels can, dagg is made in the hyper connection's reductions pass (NormInputGrad), with
  // the sums of the norm's weight and bias gradients, which a weight gradient of `kind` adds
  // up.
  void norm_and_hc_backward(WeightGrad kind, HcState& m, const bf16* agg, const Slot& norm_w, const Slot& norm_b,
                            const float* mean, const float* rstd, const bf16* grad_out, const bf16* x, const bf16* y,
                            const Slot& bias, cpu::DropoutSpec d, bf16* grad_x, HcState* below,
                            cpu::DropoutSpec below_dropout, const ModelConfig& c) {
    const bool fuse = cuda::norm_input_grad_supported(C, d);
    check(fuse || agg, "GptCuda: the pre-norm's backward needs the aggregate, which the forward did not keep");
    if (!fuse) {
      norm_backward(dln.data(), agg, norm_w, norm_b, mean, rstd, dagg.data(), false);
      hc_backward(m, grad_out, x, y, bias, d, dagg.data(), grad_x, below, below_dropout, c, nullptr);
      return;
    }
    float* partials = norm_param_partials[kind == kLn1 ? 0 : 1].data();
    await_weight_grad(kind);  // the layer above's sums, which read the partials
    const cuda::NormInputGrad norm{dln.data(), value_of(norm_w), mean, rstd, rms, dagg.data(), partials};
    hc_backward(m, grad_out, x, y, bias, d, dagg.data(), grad_x, below, below_dropout, c, &norm);
    weight_grad(kind, [&](cudaStream_t on, float*) {
      cuda::add_norm_param_partials(partials, cuda::norm_input_grad_runs(N), C, grad_of(norm_w), grad_of(norm_b), on);
    });
  }
  // The mappings, the aggregate and the sublayer's pre-norm of it (in the aggregate's pass
  // where the kernels can, else after it). x_sumsq: the input's ||x||^2 when its producer
  // computed it, else null.
  void mappings_forward(HcState& m, const bf16* x, const float* x_sumsq, bf16* agg, const Slot& norm_w,
                        const Slot& norm_b, bf16* norm_out, float* mean, float* rstd, const ModelConfig& c) {
    const cuda::AggregateNorm fused{value_of(norm_w), value_of(norm_b), eps, rms, norm_out, mean, rstd};
    const bool fuse = cuda::aggregate_norm_supported(C);
    cuda::mhc_mappings_forward(mappings_args(c), x, x_sumsq, value_of(m.weight), value_of(m.alpha), value_of(m.bias),
                               m.proj.data(), m.r.data(), m.h_pre.data(), m.h_post.data(), m.h_res.data(),
                               mappings_forward_ws.data(), stream, m.weight_split.data(), agg,
                               fuse ? &fused : nullptr);
    if (!fuse) norm(agg, norm_w, norm_b, norm_out, mean, rstd);
  }
  // next_sumsq: where the next layer's first hyper connection wants ||x_out||^2 (or null).
  void layer_forward(CudaLayer& L, const bf16* x_in, const float* x_in_sumsq, float* next_sumsq,
                     const ModelConfig& c) {
    const cpu::AttentionShape shape{B, S, H, C};
    if (hc)
      mappings_forward(L.hc_attn, x_in, x_in_sumsq, L.agg1, L.ln1_w, L.ln1_b, L.ln1_out, L.ln1_mean.data(),
                       L.ln1_rstd.data(), c);
    else
      norm(x_in, L.ln1_w, L.ln1_b, L.ln1_out, L.ln1_mean.data(), L.ln1_rstd.data());
    cuda::linear_forward(L.ln1_out, half_of(L.qkv_w), half_of(L.qkv_b), N, C, 3 * C, L.qkv.data(), stream);
    cuda::attention_forward(shape, L.qkv.data(), L.drop_probs, L.lse.data(), L.ctx.data(), stream, L.keep_mask.data());
    sublayer_output(L.hc_attn, L.ctx.data(), C, L.proj_w, L.proj_b, x_in, L.drop_attn, L.attn_y.data(), L.x_mid,
                    hc ? L.hc_mlp.input_sumsq.data() : nullptr);
    if (hc)
      mappings_forward(L.hc_mlp, L.x_mid, L.hc_mlp.input_sumsq.data(), L.agg2, L.ln2_w, L.ln2_b, L.ln2_out,
                       L.ln2_mean.data(), L.ln2_rstd.data(), c);
    else
      norm(L.x_mid, L.ln2_w, L.ln2_b, L.ln2_out, L.ln2_mean.data(), L.ln2_rstd.data());
    cuda::linear_forward(L.ln2_out, half_of(L.fc1_w), half_of(L.fc1_b), N, C, width, L.fc.data(), stream);
    cuda::activation_forward(activation, L.fc.data(), N, F, L.act.data(), stream);
    sublayer_output(L.hc_mlp, L.act.data(), F, L.fc2_w, L.fc2_b, L.x_mid, L.drop_mlp, L.mlp_y.data(), L.x_out,
                    next_sumsq);
  }

  // The aggregate of x with the kept H_pre and its pre-norm: in one pass where the kernels
  // fuse them (the aggregate then not kept), else into agg and then normalised.
  void restore_norm_input(const bf16* x, const HcState& m, bf16* agg, const Slot& norm_w, const Slot& norm_b, bf16* out,
                          float* mean, float* rstd) {
    if (!aggregates_kept) {
      const cuda::AggregateNorm fused{value_of(norm_w), value_of(norm_b), eps, rms, out, mean, rstd};
      cuda::aggregate_norm_forward(x, m.h_pre.data(), N, static_cast<int>(n), C, fused, stream);
      return;
    }
    cuda::aggregate_forward(x, m.h_pre.data(), N, static_cast<int>(n), C, agg, stream);
    norm(agg, norm_w, norm_b, out, mean, rstd);
  }
  // What selective recompute discarded, re-run from the layer input with the kept mappings
  // (the same arithmetic on the same inputs: the same bits, also where the forward made the
  // aggregate and its norm in the mappings' pass): aggregates, norms, fused-add outputs (the
  // MLP one only when `with_output`).
  void restore(CudaLayer& L, const bf16* x_in, bool with_output) {
    restore_norm_input(x_in, L.hc_attn, L.agg1, L.ln1_w, L.ln1_b, L.ln1_out, L.ln1_mean.data(), L.ln1_rstd.data());
    residual_forward(L.hc_attn, x_in, L.attn_y.data(), L.proj_b, L.drop_attn, L.x_mid);
    restore_norm_input(L.x_mid, L.hc_mlp, L.agg2, L.ln2_w, L.ln2_b, L.ln2_out, L.ln2_mean.data(), L.ln2_rstd.data());
    if (with_output) residual_forward(L.hc_mlp, L.x_mid, L.mlp_y.data(), L.fc2_b, L.drop_mlp, L.x_out);
  }

  // grad_out: d loss / d x_out; grad_in: d loss / d x_in (overwritten); grad_mid: scratch.
  // Returns where d loss / d x_in is: grad_in with hyper connections, else grad_out's
  // buffer (a plain residual adds the sublayers' input gradients to dout in place).
  // below: the layer under this one, or null.
  bf16* layer_backward(CudaLayer& L, const bf16* x_in, bf16* grad_out, bf16* grad_in, bf16* grad_mid,
                       CudaLayer* below, const ModelConfig& c) {
    if (!hc) grad_mid = grad_in = grad_out;
    const cpu::AttentionShape shape{B, S, H, C};
    float* columns = columns_ws.data();
    const bf16* dy_mlp = residual_backward(L.hc_mlp, grad_out, L.fc2_b, L.drop_mlp);
    cuda::linear_backward_input(dy_mlp, half_of(L.fc2_w), N, F, C, dact.data(), stream);
    linear_weight_grad(kFc2, dy_mlp, L.act.data(), F, C, L.fc2_w, nullptr);
    // fc1's bias gradient comes out of the activation's backward (one pass over dfc)
    await_weight_grad(kFc1);  // the layer above's, which reads dfc
    cuda::activation_backward(activation, dact.data(), L.fc.data(), N, F, dfc.data(), grad_of(L.fc1_b), columns,
                              stream);
    cuda::linear_backward_input(dfc.data(), half_of(L.fc1_w), N, C, width, dln.data(), stream);
    linear_weight_grad(kFc1, dfc.data(), L.ln2_out, C, width, L.fc1_w, nullptr);
    // dy_mlp is overwritten from here on (the next dy, or dout accumulated in place)
    await_weight_grad(kFc2);
    if (hc) {
      norm_and_hc_backward(kLn2, L.hc_mlp, L.agg2, L.ln2_w, L.ln2_b, L.ln2_mean.data(), L.ln2_rstd.data(), grad_out,
                           L.x_mid, L.mlp_y.data(), L.fc2_b, L.drop_mlp, grad_mid, &L.hc_attn, L.drop_attn, c);
    } else {
      norm_backward(dln.data(), L.x_mid, L.ln2_w, L.ln2_b, L.ln2_mean.data(), L.ln2_rstd.data(), grad_mid, true,
                    output_bias_grad(L.fc2_b, L.drop_mlp));
    }
    const bf16* dy_attn = residual_backward(L.hc_attn, grad_mid, L.proj_b, L.drop_attn);
    cuda::linear_backward_input(dy_attn, half_of(L.proj_w), N, C, C, dctx.data(), stream);
    linear_weight_grad(kProj, dy_attn, L.ctx.data(), C, C, L.proj_w, nullptr);
    await_weight_grad(kQkv);  // the layer above's, which reads dqkv
    cuda::attention_backward(shape, dctx.data(), L.qkv.data(), L.ctx.data(), L.lse.data(), L.drop_probs, dqkv.data(),
                             attention_ws.data(), stream, L.keep_mask.data());
    cuda::linear_backward_input(dqkv.data(), half_of(L.qkv_w), N, C, 3 * C, dln.data(), stream);
    linear_weight_grad(kQkv, dqkv.data(), L.ln1_out, C, 3 * C, L.qkv_w, &L.qkv_b);
    await_weight_grad(kProj);  // dy_attn is overwritten from here on
    if (hc) {
      norm_and_hc_backward(kLn1, L.hc_attn, L.agg1, L.ln1_w, L.ln1_b, L.ln1_mean.data(), L.ln1_rstd.data(),
                           grad_mid, x_in, L.attn_y.data(), L.proj_b, L.drop_attn, grad_in,
                           below ? &below->hc_mlp : nullptr, below ? below->drop_mlp : cpu::DropoutSpec{}, c);
    } else {
      norm_backward(dln.data(), x_in, L.ln1_w, L.ln1_b, L.ln1_mean.data(), L.ln1_rstd.data(), grad_in, true,
                    output_bias_grad(L.proj_b, L.drop_attn));
    }
    return grad_in;
  }

  const bf16* layer_input(size_t l) const { return l == 0 ? x0.data() : layers[l - 1].x_out; }
  // The final norm's input: the streams' mean (h), or with one stream the last layer's output.
  const bf16* contracted() const { return n == 1 ? layers.back().x_out : h.data(); }

  // Final norm, logits and loss per chunk of rows; with `train`, the head's backward too
  // (dhf, and dwte accumulated). The per-row losses stay on the device (mean_loss()).
  void head(bool train) {
    const bf16* wte_half = half_of(wte);
    for (int64_t r0 = 0; r0 < N; r0 += head_rows) {
      const int64_t rows = std::min(head_rows, N - r0);
      cuda::Gemm g;  // logits^T [V, rows] = wte [V, C] hf^T [C, rows]
      g.trans_a = true;
      g.m = V, g.n = rows, g.k = C;
      g.a = wte_half, g.lda = C;
      g.b = hf.data() + r0 * C, g.ldb = C;
      g.d = logits.data(), g.ldd = V, g.output = cuda::GemmOutput::Bf16;
      cuda::gemm(g, stream);
      // The logits become their gradient in place.
      cuda::cross_entropy(logits.data(), targets.data() + r0, rows, V, 1.0f / static_cast<float>(N),
                          losses.data() + r0, stream);
      if (!train) continue;
      // dhf^T [C, rows] = wte^T [C, V] dlogits^T [V, rows];  dwte^T [C, V] += hf^T [C, rows] dlogits [rows, V]
      // (the first chunk of a fresh step writes dwte; the embedding's backward adds to it)
      cuda::linear_backward(logits.data(), hf.data() + r0 * C, wte_half, rows, C, V, dhf.data() + r0 * C,
                            grad_of(wte), nullptr, nullptr, stream, /*accumulate=*/!grads_fresh || r0 > 0);
    }
  }
  // The mean of N per-row losses, summed in order.
  double mean_of_rows(const float* per_row) const {
    double total = 0;
    for (int64_t r = 0; r < N; ++r) total += per_row[r];
    return total / static_cast<double>(N);
  }
  // The last forward's mean loss (waits for the stream).
  double mean_loss() const { return mean_of_rows(losses.download().data()); }

  // The batch, and the step the forward's dropout keys are made from, through host slot k.
  void upload_batch(const int32_t* tokens_host, const int32_t* targets_host, uint64_t step, size_t k) {
    check_token_ids(tokens_host, N, V, "token");
    check_token_ids(targets_host, N, V, "target");
    HostSlot& slot = host_slot(k);
    slot.uploaded.synchronize();
    std::copy(tokens_host, tokens_host + N, slot.tokens.data());
    std::copy(targets_host, targets_host + N, slot.targets.data());
    slot.step.data()[0] = step;
    MHC_CUDA_CHECK(
        cudaMemcpyAsync(tokens.data(), slot.tokens.data(), N * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
    MHC_CUDA_CHECK(
        cudaMemcpyAsync(targets.data(), slot.targets.data(), N * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
    MHC_CUDA_CHECK(
        cudaMemcpyAsync(dropout_step.data(), slot.step.data(), sizeof(uint64_t), cudaMemcpyHostToDevice, stream));
    slot.uploaded.record(stream);
  }

  // The mean loss of a batch: upload, forward and head (its backward too with `train`).
  double loss(const int32_t* tokens_host, const int32_t* targets_host, uint64_t step, const ModelConfig& c,
              bool train) {
    upload_batch(tokens_host, targets_host, step, micro_batches);  // a slot no queued micro-batch uses
    forward(c, train);
    return mean_loss();
  }

  // Every hyper connection's W split into bf16 parts in one launch, for the mappings'
  // forward and backward (and a recompute's forward) of this step.
  void split_mapping_weights(const ModelConfig& c) {
    std::vector<const float*> weights;
    std::vector<bf16*> splits;
    for (CudaLayer& L : layers)
      for (HcState* m : {&L.hc_attn, &L.hc_mlp}) {
        weights.push_back(value_of(m->weight));
        splits.push_back(m->weight_split.data());
      }
    cuda::split_mappings_weights(mappings_args(c), weights.data(), splits.data(), static_cast<int>(weights.size()),
                                 stream);
  }
  // The forward of the uploaded batch and the head (its backward too with `train`).
  void forward(const ModelConfig& c, bool train) {
    const auto hidden_p = train ? static_cast<float>(c.hidden_dropout) : 0.0f;
    const auto attention_p = train ? static_cast<float>(c.attention_dropout) : 0.0f;
    if (hidden_p > 0 || attention_p > 0)  // from the step upload_batch gave
      cuda::dropout_keys(seed, static_cast<int64_t>(layers.size()), {kAttentionResidual, kMlpResidual, kAttentionProbs},
                         dropout_step.data(), dropout_keys.data(), stream);
    // With one stream the expansion and the contraction are the identity (the same bits):
    // the embedding is x0, the final norm reads the last layer's output, and the gradients
    // pass through in place (e, h, dh and de are then not allocated).
    cuda::embedding_forward(tokens.data(), value_of(wte), value_of(wpe), B, S, C, n == 1 ? x0.data() : e.data(),
                            stream);
    if (n > 1) cuda::stream_expand_forward(e.data(), N, static_cast<int>(n), C, x0.data(), stream);
    if (hc) split_mapping_weights(c);
    for (size_t l = 0; l < layers.size(); ++l) {
      CudaLayer& L = layers[l];
      const uint64_t* keys = dropout_keys.data() + l * kDropoutSites;  // rng_key(seed, l, step, site)
      L.drop_attn = {hidden_p, 0, keys + kAttentionResidual, L.kept_attn.data()};
      L.drop_mlp = {hidden_p, 0, keys + kMlpResidual, L.kept_mlp.data()};
      L.drop_probs = {attention_p, 0, keys + kAttentionProbs};
      // Layer 0's input comes from the expansion: its mappings compute ||x||^2 themselves.
      const float* in_sumsq = hc && l > 0 ? L.hc_attn.input_sumsq.data() : nullptr;
      float* next_sumsq = hc && l + 1 < layers.size() ? layers[l + 1].hc_attn.input_sumsq.data() : nullptr;
      layer_forward(L, layer_input(l), in_sumsq, next_sumsq, c);
    }
    if (n > 1) cuda::stream_contract_forward(layers.back().x_out, N, static_cast<int>(n), C, h.data(), stream);
    norm(contracted(), lnf_w, lnf_b, hf.data(), lnf_mean.data(), lnf_rstd.data());
    head(train);
  }

  void backward(const ModelConfig& c) {
    for (CudaLayer& L : layers) L.hc_attn.grad_y_written = L.hc_mlp.grad_y_written = false;
    norm_backward(dhf.data(), contracted(), lnf_w, lnf_b, lnf_mean.data(), lnf_rstd.data(),
                  n == 1 ? dx_a.data() : dh.data(), false);
    if (n > 1) cuda::stream_contract_backward(dh.data(), N, static_cast<int>(n), C, dx_a.data(), stream);
    bf16* grad_out = dx_a.data();
    bf16* grad_in = dx_b.data();
    for (size_t l = layers.size(); l-- > 0;) {
      if (recompute && plan.ends_block(static_cast<int>(l))) {
        await_weight_grads();  // they read the restorable tensors the restore overwrites
        const RecomputeBlock& block = plan.block_of(static_cast<int>(l));
        for (int k = block.first; k <= block.last; ++k)
          restore(layers[static_cast<size_t>(k)], layer_input(static_cast<size_t>(k)), k != block.last);
      }
      CudaLayer* below = l > 0 ? &layers[l - 1] : nullptr;
      if (layer_backward(layers[l], layer_input(l), grad_out, grad_in, dx_mid.data(), below, c) == grad_in)
        std::swap(grad_out, grad_in);
    }
    await_weight_grads();
    if (n > 1) cuda::stream_expand_backward(grad_out, N, static_cast<int>(n), C, de.data(), stream);
    cuda::embedding_backward(n == 1 ? grad_out : de.data(), tokens.data(), B, S, C, V, grad_of(wte), grad_of(wpe),
                             embedding_ws.data(), stream);
    grads_fresh = false;
  }

  void forward_backward(const int32_t* tokens_host, const int32_t* targets_host, uint64_t step, const ModelConfig& c) {
    const size_t k = micro_batches;
    upload_batch(tokens_host, targets_host, step, k);
    const auto launches = [&] {
      forward(c, true);
      backward(c);
    };
    cuda::Graph& graph = train_graph[grads_fresh ? 0 : 1];
    if (!graphs) {
      launches();
    } else if (graph.ready()) {
      graph.launch(stream);
    } else if (warmed_up) {
      graph.capture(stream, launches);
      graph.launch(stream);
    } else {
      launches();
      warmed_up = true;
    }
    grads_fresh = false;  // as backward() does; a replay runs none of its host code
    MHC_CUDA_CHECK(
        cudaMemcpyAsync(host_slot(k).losses.data(), losses.data(), N * sizeof(float), cudaMemcpyDeviceToHost, stream));
    ++micro_batches;  // counted once queued: a micro-batch that threw has no loss to read
  }
};

GptCuda::GptCuda(const ModelConfig& config, int64_t batch, int64_t seq) : config_(config) {
  config_.validate();
  const ModelConfig& c = config_;
  check(cuda::device_available(), "--device cuda: no CUDA device");
  check(c.recompute != "full", "recompute: full recompute is not implemented (none or mhc)");
  check(batch >= 1 && seq >= 1 && seq <= c.seq_length, "seq: must be in [1, seq_length]");
  check(c.hidden_size % c.num_attention_heads == 0, "hidden_size: must be a multiple of num_attention_heads");
  check(cuda::attention_head_dim_supported(c.hidden_size / c.num_attention_heads),
        "hidden_size / num_attention_heads: the CUDA attention takes head dims 16, 32 or 64, got " +
            std::to_string(c.hidden_size / c.num_attention_heads));
  s_ = std::make_unique<State>();
  State& s = *s_;
  s.B = batch, s.S = seq, s.N = batch * seq, s.C = c.hidden_size, s.n = c.streams(), s.F = c.ffn_size();
  s.activation = c.activation == "swiglu" ? cpu::Activation::SwiGlu : cpu::Activation::Gelu;
  s.width = cpu::activation_input_width(s.activation, s.F);
  s.V = c.vocab_size, s.H = c.num_attention_heads, s.hc = c.hyper_connections(), s.rms = c.normalization == "RMSNorm";
  s.eps = static_cast<float>(c.layernorm_epsilon);
  s.recompute = c.recompute == "mhc" && s.hc;
  s.plan = RecomputePlan(static_cast<int>(c.num_layers), c.mhc_recompute_layer_num);
  check(cuda::stream_count_supported(static_cast<int>(s.n)), "num_residual_streams: no CUDA kernel for this n");
  const int64_t N = s.N, C = s.C, n = s.n;

  // Parameters: the host model's, one arena each for values, gradients and moments.
  s.host = std::make_unique<Gpt<float>>(c, 1, 1);
  // Each tensor starts 64 bytes into the arenas (the kernels' vector accesses need it),
  // except that a hyper connection's three gates stay consecutive: the kernels take them
  // as one [3] array. The padding stays zero (zero gradient, zero moments). The tensors
  // with weight decay take [0, decay_end), so that the optimizer step is two launches;
  // `slots` stays in host parameter order.
  const std::vector<Parameter<float>*> params = s.host->parameters();
  s.slots.resize(params.size());
  auto place = [&](auto&& belongs) {
    for (size_t k = 0; k < params.size(); ++k) {
      Parameter<float>* p = params[k];
      if (!belongs(p->name)) continue;
      const bool gate = p->name.ends_with("alpha_post") || p->name.ends_with("alpha_res");
      if (!gate) s.parameter_count = (s.parameter_count + 15) / 16 * 16;
      s.slots[k] = {p, s.parameter_count};
      s.parameter_count += p->size();
    }
  };
  // Within the tensors with weight decay, those written_by_products take [0, products_end).
  place([](const std::string& name) { return decays(name) && written_by_products(name); });
  s.products_end = s.parameter_count;
  place([](const std::string& name) { return decays(name) && !written_by_products(name); });
  s.decay_end = s.parameter_count;
  place([](const std::string& name) { return !decays(name); });
  const auto count = static_cast<size_t>(s.parameter_count);
  s.value = DeviceBuffer<float>(count);
  s.grad = DeviceBuffer<float>(count);
  s.exp_avg = DeviceBuffer<float>(count);
  s.exp_avg_sq = DeviceBuffer<float>(count);
  s.half = DeviceBuffer<bf16>(count);
  s.value.fill_bytes(0);
  s.exp_avg.fill_bytes(0);
  s.exp_avg_sq.fill_bytes(0);
  s.grad.fill_bytes(0);
  // Names tell the slots apart (the host model's parameter order).
  auto find = [&](const std::string& name) {
    for (const Slot& slot : s.slots)
      if (slot.host->name == name) return slot;
    // absent (e.g. no bias): an empty stand-in
    static Parameter<float> empty;
    return Slot{&empty, 0};
  };
  s.wte = find("embedding.word_embeddings.weight");
  s.wpe = find("embedding.position_embeddings.weight");
  s.lnf_w = find("decoder.final_layernorm.weight");
  s.lnf_b = find("decoder.final_layernorm.bias");

  const cuda::MappingsArgs args{N, static_cast<int>(n), C, 1};
  // A plain residual without dropout adds in the output products' epilogues: no sublayer
  // outputs y and no dy buffer (see residual_add_in_epilogue).
  const bool epilogue_add = !s.hc && c.hidden_dropout <= 0;
  // Where the aggregate's norm is fused both ways, neither the forward nor recompute's
  // restore keeps the aggregate: the backward's reductions make it again from x (GPT-2
  // small: 560 MB less for about 0.2 ms a step; reading a kept one where there is one made
  // the reductions' kernel slower still, docs/training.md session 27).
  s.aggregates_kept = s.hc && !cuda::aggregate_norm_supported(C);
  const int64_t restorable = restorable_elements(N, C, n, s.aggregates_kept);
  if (s.recompute) s.workspace = DeviceBuffer<bf16>(s.plan.max_block_size() * restorable);
  s.layers.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    CudaLayer& L = s.layers[l];
    const std::string p = "decoder.layers." + std::to_string(l) + ".";
    L.ln1_w = find(p + "input_layernorm.weight"), L.ln1_b = find(p + "input_layernorm.bias");
    L.qkv_w = find(p + "self_attention.linear_qkv.weight"), L.qkv_b = find(p + "self_attention.linear_qkv.bias");
    L.proj_w = find(p + "self_attention.linear_proj.weight"), L.proj_b = find(p + "self_attention.linear_proj.bias");
    L.ln2_w = find(p + "pre_mlp_layernorm.weight"), L.ln2_b = find(p + "pre_mlp_layernorm.bias");
    L.fc1_w = find(p + "mlp.linear_fc1.weight"), L.fc1_b = find(p + "mlp.linear_fc1.bias");
    L.fc2_w = find(p + "mlp.linear_fc2.weight"), L.fc2_b = find(p + "mlp.linear_fc2.bias");
    if (s.hc) {
      for (auto [m, prefix] : {std::pair{&L.hc_attn, p + "self_attention_hyper_connection."},
                               std::pair{&L.hc_mlp, p + "mlp_hyper_connection."}}) {
        m->weight = find(prefix + "mapping_proj.weight");
        m->sublayer_bias = m == &L.hc_attn ? L.proj_b : L.fc2_b;
        m->alpha = find(prefix + "alpha_pre");
        m->bias = find(prefix + "bias");
        check(find(prefix + "alpha_post").offset == m->alpha.offset + 1 &&
                  find(prefix + "alpha_res").offset == m->alpha.offset + 2,
              "GptCuda: the gates of " + prefix + " are not consecutive");
        const int64_t width = n * n + 2 * n;
        m->proj = DeviceBuffer<float>(N * width);
        m->r = DeviceBuffer<float>(N);
        m->h_pre = DeviceBuffer<float>(N * n);
        m->h_post = DeviceBuffer<float>(N * n);
        m->h_res = DeviceBuffer<float>(N * n * n);
        m->input_sumsq = DeviceBuffer<float>(N);
        m->weight_split = DeviceBuffer<bf16>(cuda::mappings_weight_split_elements(s.mappings_args(c)));
      }
    }
    const size_t stats = s.rms ? 0 : static_cast<size_t>(N);
    L.ln1_mean = DeviceBuffer<float>(stats), L.ln2_mean = DeviceBuffer<float>(stats);
    L.ln1_rstd = DeviceBuffer<float>(N), L.ln2_rstd = DeviceBuffer<float>(N);
    L.qkv = DeviceBuffer<bf16>(N * 3 * C);
    L.lse = DeviceBuffer<float>(batch * s.H * seq);
    // With attention dropout the forward keeps its mask as bits for the backward where they
    // take at most the layer's qkv (T up to 48 C / heads: 3072 at GPT-2 small); past that
    // each attention kernel makes the mask itself, so that memory stays linear in T.
    const size_t mask_words = cuda::attention_keep_mask_words({batch, seq, s.H, C});
    if (c.attention_dropout > 0 && mask_words * sizeof(uint32_t) <= static_cast<size_t>(N * 3 * C) * sizeof(bf16))
      L.keep_mask = DeviceBuffer<uint32_t>(mask_words);
    // The residual dropouts' masks as bits (a sixteenth of the n-stream output), so that the
    // backward reads them (and makes dagg in the reductions' pass) instead of the Philox stream.
    if (c.hidden_dropout > 0 && C % 8 == 0)
      for (auto* kept : {&L.kept_attn, &L.kept_mlp}) *kept = DeviceBuffer<uint8_t>(static_cast<size_t>(N * n * C / 8));
    L.ctx = DeviceBuffer<bf16>(N * C);
    if (!epilogue_add) L.attn_y = DeviceBuffer<bf16>(N * C), L.mlp_y = DeviceBuffer<bf16>(N * C);
    L.fc = DeviceBuffer<bf16>(N * s.width), L.act = DeviceBuffer<bf16>(N * s.F);
    bf16* base;
    if (s.recompute) {
      base = s.workspace.data() + s.plan.slot(static_cast<int>(l)) * restorable;
      if (s.plan.ends_block(static_cast<int>(l))) L.own = DeviceBuffer<bf16>(N * n * C);
    } else {
      L.own = DeviceBuffer<bf16>(restorable);
      base = L.own.data();
    }
    static_cast<RestorableTensors<bf16>&>(L) = carve_restorable(base, N, C, n, s.aggregates_kept);
    if (s.recompute && s.plan.ends_block(static_cast<int>(l))) L.x_out = L.own.data();
  }
  // At most about 512 MB of bf16 logits (then their gradient) at a time.
  s.head_rows = std::clamp<int64_t>((int64_t{512} << 20) / (2 * s.V), 1, N);
  s.tokens = DeviceBuffer<int32_t>(N), s.targets = DeviceBuffer<int32_t>(N);
  s.dropout_step = DeviceBuffer<uint64_t>(1);
  s.dropout_keys = DeviceBuffer<uint64_t>(static_cast<size_t>(c.num_layers) * kDropoutSites);
  s.x0 = DeviceBuffer<bf16>(N * n * C), s.hf = DeviceBuffer<bf16>(N * C);
  if (n > 1)  // expand's and contract's own rows; with one stream they work in place (forward())
    for (auto* b : {&s.e, &s.h, &s.dh, &s.de}) *b = DeviceBuffer<bf16>(N * C);
  s.lnf_mean = DeviceBuffer<float>(s.rms ? 0 : N), s.lnf_rstd = DeviceBuffer<float>(N);
  s.logits = DeviceBuffer<bf16>(s.head_rows * s.V);
  s.losses = DeviceBuffer<float>(N);
  s.ones = DeviceBuffer<float>(std::vector<float>(N, 1.0f));
  s.dx_a = DeviceBuffer<bf16>(N * n * C);
  for (auto* b : {&s.dln, &s.dctx, &s.dhf}) *b = DeviceBuffer<bf16>(N * C);
  if (!epilogue_add) s.dy = DeviceBuffer<bf16>(N * C);
  s.dqkv = DeviceBuffer<bf16>(N * 3 * C), s.dfc = DeviceBuffer<bf16>(N * s.width), s.dact = DeviceBuffer<bf16>(N * s.F);
  if (s.hc) {  // the hyper connections' backward only (a plain residual accumulates into dx_a in place)
    for (auto* b : {&s.dx_b, &s.dx_mid}) *b = DeviceBuffer<bf16>(N * n * C);
    s.dagg = DeviceBuffer<bf16>(N * C);
    s.grad_h_pre = DeviceBuffer<float>(N * n), s.grad_h_post = DeviceBuffer<float>(N * n);
    s.grad_h_res = DeviceBuffer<float>(N * n * n);
  }
  if (s.hc) {
    s.mappings_forward_ws = DeviceBuffer<float>(cuda::mappings_forward_workspace_floats(args));
    s.mappings_backward_ws = DeviceBuffer<float>(cuda::mappings_backward_workspace_floats(args));
    if (cuda::norm_input_grad_supported(C, {}))
      for (auto& p : s.norm_param_partials) p = DeviceBuffer<float>(cuda::norm_param_partials_floats(N, C));
  }
  const int64_t widest = std::max({3 * C, s.width, s.V});
  s.columns_ws = DeviceBuffer<float>(std::max({cuda::norm_backward_workspace_floats(N, C),
                                               cuda::h_post_bda_grad_y_workspace_floats(N, C),
                                               cuda::linear_backward_workspace_floats(N, widest),
                                               cuda::activation_backward_workspace_floats(s.activation, N, s.F)}));
  s.side_columns_ws = DeviceBuffer<float>(cuda::linear_backward_workspace_floats(N, 3 * C));
  s.attention_ws = DeviceBuffer<unsigned char>(cuda::attention_workspace_bytes({batch, seq, s.H, C}));
  s.embedding_ws = DeviceBuffer<unsigned char>(cuda::embedding_backward_workspace_bytes(batch, seq, C));
  s.norm_ws = DeviceBuffer<double>(cuda::grad_norm_workspace_doubles(1));
  if (s.hc) {
    std::vector<const float*> h_res;
    for (CudaLayer& L : s.layers)
      for (HcState* m : {&L.hc_attn, &L.hc_mlp}) h_res.push_back(m->h_res.data());
    s.module_h_res = DeviceBuffer<const float*>(h_res);
    s.gains_ws = DeviceBuffer<float>(cuda::gains_workspace_floats(static_cast<int64_t>(h_res.size()), N));
    s.gains_stats = DeviceBuffer<float>(h_res.size() * 8);
  }
  s.norm_result = DeviceBuffer<float>(2);
}

GptCuda::~GptCuda() = default;

std::vector<Parameter<float>*> GptCuda::parameters() { return s_->host->parameters(); }

void GptCuda::init(uint64_t seed) {
  s_->seed = seed;
  s_->host->init(seed);
  upload();
}

void GptCuda::upload() {
  State& s = *s_;
  std::vector<float> all(static_cast<size_t>(s.parameter_count));
  for (const Slot& slot : s.slots) std::copy(slot.host->value.begin(), slot.host->value.end(), all.begin() + slot.offset);
  s.value.upload(all);
  std::vector<bf16> half(all.size());
  for (size_t i = 0; i < all.size(); ++i) half[i] = __float2bfloat16(all[i]);
  s.half.upload(half);
}

void GptCuda::download() {
  State& s = *s_;
  const std::vector<float> all = s.value.download();
  for (const Slot& slot : s.slots)
    std::copy(all.begin() + slot.offset, all.begin() + slot.offset + slot.size(), slot.host->value.begin());
}

void GptCuda::zero_grad() {
  State& s = *s_;
  MHC_CUDA_CHECK(cudaMemsetAsync(s.grad.data() + s.products_end, 0,
                                 (s.grad.size() - static_cast<size_t>(s.products_end)) * sizeof(float), s.stream));
  s.grads_fresh = true;
  s.micro_batches = 0;
}

double GptCuda::forward(const int32_t* tokens, const int32_t* targets, uint64_t step) {
  return s_->loss(tokens, targets, step, config_, true);
}

void GptCuda::backward() { s_->backward(config_); }

void GptCuda::forward_backward(const int32_t* tokens, const int32_t* targets, uint64_t step) {
  s_->forward_backward(tokens, targets, step, config_);
}

std::vector<double> GptCuda::micro_batch_losses() {
  State& s = *s_;
  MHC_CUDA_CHECK(cudaStreamSynchronize(s.stream));
  std::vector<double> means;
  for (size_t k = 0; k < s.micro_batches; ++k) means.push_back(s.mean_of_rows(s.host_slot(k).losses.data()));
  return means;
}

void GptCuda::set_overlap(bool on) {
  s_->overlap = on;
  for (cuda::Graph& g : s_->train_graph) g.reset();  // captured with the other setting
}

void GptCuda::set_graphs(bool on) {
  s_->graphs = on;
  if (!on)
    for (cuda::Graph& g : s_->train_graph) g.reset();
}

double GptCuda::evaluate(const int32_t* tokens, const int32_t* targets) {
  return s_->loss(tokens, targets, 0, config_, false);
}

double GptCuda::step(const TrainConfig& config, double lr) {
  State& s = *s_;
  ++s.steps_taken;
  const float scale = 1.0f / static_cast<float>(config.grad_accumulation);
  cuda::grad_norm({{s.grad.data(), s.parameter_count}}, scale, static_cast<float>(config.grad_clip), s.norm_ws.data(),
                  s.norm_result.data(), s.stream);
  const AdamWScalars a = adamw_scalars(config, lr, s.steps_taken);
  // One update for the parameters with weight decay, one for the rest.
  for (const bool decay : {true, false}) {
    const int64_t offset = decay ? 0 : s.decay_end, size = (decay ? s.decay_end : s.parameter_count) - offset;
    const cuda::AdamWStep st{a.beta1, a.beta2, a.eps, a.step_size, a.sqrt_correction2, decay ? a.decay : 1.0f, scale};
    cuda::adamw_update(st, s.grad.data() + offset, s.norm_result.data() + 1, size, s.value.data() + offset,
                       s.exp_avg.data() + offset, s.exp_avg_sq.data() + offset, s.half.data() + offset, s.stream);
  }
  return s.norm_result.download()[0];
}

int64_t GptCuda::steps_taken() const { return s_->steps_taken; }

Gpt<float>& GptCuda::host() { return *s_->host; }

std::vector<GainStats> GptCuda::gains() {
  State& s = *s_;
  if (!s.hc) return {};
  const auto modules = static_cast<int64_t>(s.module_h_res.size());
  cuda::hc_gains(s.module_h_res.data(), modules, s.N, static_cast<int>(s.n), s.gains_ws.data(), s.gains_stats.data(), s.stream);
  const std::vector<float> v = s.gains_stats.download();
  std::vector<GainStats> out(static_cast<size_t>(modules));
  for (size_t m = 0; m < out.size(); ++m) {
    const float* g = v.data() + m * 8;  // [fwd, bwd, composite fwd, composite bwd] x [max, mean]
    out[m] = {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]};
  }
  return out;
}

void GptCuda::download_optimizer(AdamW& optimizer) {
  State& s = *s_;
  check(optimizer.exp_avg.size() == s.slots.size(), "GptCuda: the optimizer is not over this model's parameters");
  const std::vector<float> m = s.exp_avg.download(), v = s.exp_avg_sq.download();
  for (size_t k = 0; k < s.slots.size(); ++k) {
    const Slot& slot = s.slots[k];
    std::copy(m.begin() + slot.offset, m.begin() + slot.offset + slot.size(), optimizer.exp_avg[k].begin());
    std::copy(v.begin() + slot.offset, v.begin() + slot.offset + slot.size(), optimizer.exp_avg_sq[k].begin());
  }
  optimizer.steps_taken = s.steps_taken;
}

void GptCuda::upload_optimizer(const AdamW& optimizer) {
  State& s = *s_;
  check(optimizer.exp_avg.size() == s.slots.size(), "GptCuda: the optimizer is not over this model's parameters");
  std::vector<float> m(static_cast<size_t>(s.parameter_count), 0.0f), v(m.size(), 0.0f);
  for (size_t k = 0; k < s.slots.size(); ++k) {
    std::copy(optimizer.exp_avg[k].begin(), optimizer.exp_avg[k].end(), m.begin() + s.slots[k].offset);
    std::copy(optimizer.exp_avg_sq[k].begin(), optimizer.exp_avg_sq[k].end(), v.begin() + s.slots[k].offset);
  }
  s.exp_avg.upload(m);
  s.exp_avg_sq.upload(v);
  s.steps_taken = optimizer.steps_taken;
}

}  // namespace mhc
