#include "nn/gpt.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "core/rng.h"
#include "ops/cpu/activation.h"
#include "ops/cpu/aggregate.h"
#include "ops/cpu/attention.h"
#include "ops/cpu/embedding.h"
#include "ops/cpu/h_post_bda.h"
#include "ops/cpu/layernorm.h"
#include "ops/cpu/linear.h"
#include "ops/cpu/stream_expand.h"

namespace mhc {

namespace {

cpu::Activation activation_of(const ModelConfig& c) {
  return c.activation == "swiglu" ? cpu::Activation::SwiGlu : cpu::Activation::Gelu;
}

// Element counts of one layer's activations; the model allocates exactly these.
struct LayerSizes {
  int64_t hc_saved = 0;    // both hyper connections' mappings
  int64_t internals = 0;   // norm statistics, qkv, attention probabilities, MLP internals, sublayer outputs
  int64_t restorable = 0;  // aggregates, norm outputs, fused-add outputs (discarded under recompute)
  int64_t boundary = 0;    // the MLP fused-add output, kept at a recompute block's end
};

LayerSizes layer_sizes(const ModelConfig& c, int64_t batch, int64_t seq) {
  const int64_t N = batch * seq, C = c.hidden_size, n = c.streams(), F = c.ffn_size();
  const int64_t width = cpu::activation_input_width(activation_of(c), F);
  const int64_t stats = c.normalization == "RMSNorm" ? 1 : 2;
  LayerSizes s;
  if (c.hyper_connections()) {
    const int64_t m = cpu::mhc_mapping_width(static_cast<int>(n));
    s.hc_saved = 2 * N * (m + 1 + 2 * n + n * n);
  }
  s.internals = 2 * stats * N + 3 * N * C + batch * c.num_attention_heads * seq * seq + 2 * N * C + N * width +
                N * F + N * C;
  s.restorable = restorable_elements(N, C, n, c.hyper_connections());
  s.boundary = N * n * C;
  return s;
}

bool recomputing(const ModelConfig& c) { return c.recompute == "mhc" && c.hyper_connections(); }

}  // namespace

void check_token_ids(const int32_t* ids, int64_t count, int64_t vocab, const char* what) {
  const int32_t* bad = std::find_if(ids, ids + count, [vocab](int32_t id) { return id < 0 || id >= vocab; });
  if (bad != ids + count)
    fail(std::string(what) + " id " + std::to_string(*bad) + " at position " + std::to_string(bad - ids) +
         " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
}

ActivationBytes activation_bytes(const ModelConfig& c, int64_t batch, int64_t seq, size_t element_size) {
  c.validate();
  const LayerSizes s = layer_sizes(c, batch, seq);
  const int64_t N = batch * seq, C = c.hidden_size, n = c.streams();
  const int64_t stats = c.normalization == "RMSNorm" ? 1 : 2;
  int64_t kept = N * n * C + 2 * N * C + stats * N + N * c.vocab_size;  // x0, contract and final norm outputs, probs
  int64_t workspace = 0;
  kept += c.num_layers * (s.hc_saved + s.internals);
  if (recomputing(c)) {
    const RecomputePlan plan(static_cast<int>(c.num_layers), c.mhc_recompute_layer_num);
    kept += static_cast<int64_t>(plan.blocks().size()) * s.boundary;
    workspace = plan.max_block_size() * s.restorable;
  } else {
    kept += c.num_layers * s.restorable;
  }
  const auto bytes = static_cast<int64_t>(element_size);
  return {kept * bytes, workspace * bytes};
}

template <typename T> struct Layer : RestorableTensors<T> {
  Parameter<T> ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b;
  std::unique_ptr<HyperConnection<T>> hc_attn, hc_mlp;
  HcActivations<T> act_attn, act_mlp;
  std::vector<T> ln1_mean, ln1_rstd, qkv, probs, ctx, attn_y, ln2_mean, ln2_rstd, fc, act, mlp_y;
  std::vector<T> own;  // restorable tensors without recompute; the boundary output with it
  cpu::DropoutSpec drop_attn, drop_mlp, drop_probs;  // dropout of the last forward, replayed by backward
};

template <typename T> struct Gpt<T>::State {
  int64_t B, S, N, C, n, F, width, V, H;
  bool hc, rms, recompute;
  cpu::Activation activation;
  RecomputePlan plan;
  Parameter<T> wte, wpe, lnf_w, lnf_b;
  std::vector<Layer<T>> layers;
  std::vector<T> workspace;
  std::vector<T> e, x0, h, hf, lnf_mean, lnf_rstd, probs;
  std::vector<int32_t> targets, tokens;
  bool embeddings_overridden = false;
  // gradients of activations
  uint64_t seed = 0;  // keys the dropout streams
  bool training = true;
  std::vector<T> dx_a, dx_b, dx_mid, dagg, dln, dy, dctx, dqkv, dfc, dact, dh, dhf, de;
  // stability metrics
  std::vector<GainStats> gains;
  std::vector<T> composite, product;

  static T* ptr(Parameter<T>& p) { return p.value.empty() ? nullptr : p.value.data(); }
  static T* gptr(Parameter<T>& p) { return p.grad.empty() ? nullptr : p.grad.data(); }
  const T* layer_input(int l) const { return l == 0 ? x0.data() : layers[l - 1].x_out; }

  void norm(const T* x, Parameter<T>& w, Parameter<T>& b, const ModelConfig& c, T* out, std::vector<T>& mean,
            std::vector<T>& rstd) {
    cpu::norm_forward(x, w.value.data(), ptr(b), N, C, c.layernorm_epsilon, rms, out, rms ? nullptr : mean.data(),
                      rstd.data());
  }
  void norm_backward(const T* grad, const T* x, Parameter<T>& w, Parameter<T>& b, std::vector<T>& mean,
                     std::vector<T>& rstd, T* grad_x) {
    cpu::norm_backward(grad, x, w.value.data(), rms ? nullptr : mean.data(), rstd.data(), N, C, rms, grad_x,
                       w.grad.data(), gptr(b));
  }

  // The fused residual update of one sublayer: H_res/H_post mixing for hc and mhc, the
  // plain bias-dropout-add (identity mixing, one stream) for residual.
  void residual_forward(HyperConnection<T>* hcm, const HcActivations<T>& act, const T* x, const T* y,
                        Parameter<T>& bias, cpu::DropoutSpec d, T* out) {
    if (hcm) hcm->residual_forward(x, act, y, ptr(bias), d, out);
    else cpu::h_post_bda_forward<T>(x, nullptr, nullptr, y, ptr(bias), N, 1, C, d, out);
  }
  void residual_backward(HyperConnection<T>* hcm, HcActivations<T>& act, const T* grad_out, const T* x, const T* y,
                         Parameter<T>& bias, cpu::DropoutSpec d, T* grad_x, T* grad_y) {
    if (hcm) hcm->residual_backward(grad_out, x, act, y, ptr(bias), d, grad_x, grad_y, gptr(bias));
    else
      cpu::h_post_bda_backward<T>(grad_out, x, nullptr, nullptr, y, ptr(bias), N, 1, C, d, grad_x, nullptr, nullptr,
                                  grad_y, gptr(bias));
  }

  // The cheap ops selective recompute discards, re-run from the layer input: aggregates,
  // norms and fused-add outputs (the MLP one only when `with_output`).
  void restore(Layer<T>& L, const T* x_in, const ModelConfig& c, bool with_output) {
    L.hc_attn->aggregate(x_in, L.act_attn, L.agg1);
    norm(L.agg1, L.ln1_w, L.ln1_b, c, L.ln1_out, L.ln1_mean, L.ln1_rstd);
    residual_forward(L.hc_attn.get(), L.act_attn, x_in, L.attn_y.data(), L.proj_b, L.drop_attn,
                     L.x_mid);
    L.hc_mlp->aggregate(L.x_mid, L.act_mlp, L.agg2);
    norm(L.agg2, L.ln2_w, L.ln2_b, c, L.ln2_out, L.ln2_mean, L.ln2_rstd);
    if (with_output)
      residual_forward(L.hc_mlp.get(), L.act_mlp, L.x_mid, L.mlp_y.data(), L.fc2_b, L.drop_mlp,
                       L.x_out);
  }

  void layer_forward(Layer<T>& L, const T* x_in, const ModelConfig& c) {
    const cpu::AttentionShape shape{B, S, H, C};
    const T* norm1_in = x_in;
    if (hc) {
      L.hc_attn->forward(x_in, N, L.act_attn, L.agg1);
      norm1_in = L.agg1;
    }
    norm(norm1_in, L.ln1_w, L.ln1_b, c, L.ln1_out, L.ln1_mean, L.ln1_rstd);
    cpu::linear_forward(L.ln1_out, L.qkv_w.value.data(), ptr(L.qkv_b), N, C, 3 * C, L.qkv.data());
    cpu::attention_forward(shape, L.qkv.data(), L.drop_probs,
                           L.probs.data(), L.ctx.data());
    cpu::linear_forward<T>(L.ctx.data(), L.proj_w.value.data(), nullptr, N, C, C, L.attn_y.data());
    residual_forward(L.hc_attn.get(), L.act_attn, x_in, L.attn_y.data(), L.proj_b, L.drop_attn,
                     L.x_mid);
    const T* norm2_in = L.x_mid;
    if (hc) {
      L.hc_mlp->forward(L.x_mid, N, L.act_mlp, L.agg2);
      norm2_in = L.agg2;
    }
    norm(norm2_in, L.ln2_w, L.ln2_b, c, L.ln2_out, L.ln2_mean, L.ln2_rstd);
    cpu::linear_forward(L.ln2_out, L.fc1_w.value.data(), ptr(L.fc1_b), N, C, width, L.fc.data());
    cpu::activation_forward(activation, L.fc.data(), N, F, L.act.data());
    cpu::linear_forward<T>(L.act.data(), L.fc2_w.value.data(), nullptr, N, F, C, L.mlp_y.data());
    residual_forward(L.hc_mlp.get(), L.act_mlp, L.x_mid, L.mlp_y.data(), L.fc2_b, L.drop_mlp, L.x_out);
  }

  // grad_out: d loss / d x_out; grad_in (overwritten): d loss / d x_in; grad_mid is the
  // scratch for d loss / d x_mid.
  void layer_backward(Layer<T>& L, const T* x_in, const T* grad_out, T* grad_in, T* grad_mid) {
    const cpu::AttentionShape shape{B, S, H, C};
    const int64_t stream_elems = N * n * C;
    std::fill_n(grad_mid, stream_elems, T(0));
    residual_backward(L.hc_mlp.get(), L.act_mlp, grad_out, L.x_mid, L.mlp_y.data(), L.fc2_b, L.drop_mlp,
                      grad_mid, dy.data());
    std::fill(dact.begin(), dact.end(), T(0));
    cpu::linear_backward<T>(dy.data(), L.act.data(), L.fc2_w.value.data(), N, F, C, dact.data(), L.fc2_w.grad.data(),
                            nullptr);
    cpu::activation_backward(activation, dact.data(), L.fc.data(), N, F, dfc.data());
    std::fill(dln.begin(), dln.end(), T(0));
    cpu::linear_backward(dfc.data(), L.ln2_out, L.fc1_w.value.data(), N, C, width, dln.data(), L.fc1_w.grad.data(),
                         gptr(L.fc1_b));
    if (hc) {
      std::fill(dagg.begin(), dagg.end(), T(0));
      norm_backward(dln.data(), L.agg2, L.ln2_w, L.ln2_b, L.ln2_mean, L.ln2_rstd, dagg.data());
      L.hc_mlp->backward(dagg.data(), L.x_mid, L.act_mlp, grad_mid);
    } else {
      norm_backward(dln.data(), L.x_mid, L.ln2_w, L.ln2_b, L.ln2_mean, L.ln2_rstd, grad_mid);
    }

    std::fill_n(grad_in, stream_elems, T(0));
    residual_backward(L.hc_attn.get(), L.act_attn, grad_mid, x_in, L.attn_y.data(), L.proj_b,
                      L.drop_attn, grad_in, dy.data());
    std::fill(dctx.begin(), dctx.end(), T(0));
    cpu::linear_backward<T>(dy.data(), L.ctx.data(), L.proj_w.value.data(), N, C, C, dctx.data(),
                            L.proj_w.grad.data(), nullptr);
    cpu::attention_backward(shape, dctx.data(), L.qkv.data(), L.probs.data(),
                            L.drop_probs, dqkv.data());
    std::fill(dln.begin(), dln.end(), T(0));
    cpu::linear_backward(dqkv.data(), L.ln1_out, L.qkv_w.value.data(), N, C, 3 * C, dln.data(), L.qkv_w.grad.data(),
                         gptr(L.qkv_b));
    if (hc) {
      std::fill(dagg.begin(), dagg.end(), T(0));
      norm_backward(dln.data(), L.agg1, L.ln1_w, L.ln1_b, L.ln1_mean, L.ln1_rstd, dagg.data());
      L.hc_attn->backward(dagg.data(), x_in, L.act_attn, grad_in);
    } else {
      norm_backward(dln.data(), x_in, L.ln1_w, L.ln1_b, L.ln1_mean, L.ln1_rstd, grad_in);
    }
  }

  // Gains of every module's H_res in forward order (attention, MLP of each layer), and of
  // the composite composite_t = H_res(module) @ composite_t from the identity.
  void update_gains() {
    for (int64_t t = 0; t < N; ++t)
      for (int64_t k = 0; k < n * n; ++k) composite[t * n * n + k] = T(k / n == k % n);
    std::fill(gains.begin(), gains.end(), GainStats{});
    for (size_t m = 0; m < gains.size(); ++m) {
      GainStats& g = gains[m];
      const HcActivations<T>& module = m % 2 == 0 ? layers[m / 2].act_attn : layers[m / 2].act_mlp;
      for (int64_t t = 0; t < N; ++t) {
        const T* Hres = module.h_res.data() + t * n * n;
        T* P = composite.data() + t * n * n;
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j) {
            T sum = 0;
            for (int64_t k = 0; k < n; ++k) sum += Hres[i * n + k] * P[k * n + j];
            product[i * n + j] = sum;
          }
        std::copy(product.begin(), product.end(), P);
        auto gains_of = [&](const T* M, double& fwd_max, double& fwd_mean, double& bwd_max, double& bwd_mean) {
          double row_max = 0, col_max = 0;
          for (int64_t i = 0; i < n; ++i) {
            double row = 0, col = 0;
            for (int64_t j = 0; j < n; ++j) {
              row += std::abs(static_cast<double>(M[i * n + j]));
              col += std::abs(static_cast<double>(M[j * n + i]));
            }
            row_max = std::max(row_max, row);
            col_max = std::max(col_max, col);
          }
          fwd_max = std::max(fwd_max, row_max);
          bwd_max = std::max(bwd_max, col_max);
          fwd_mean += row_max / static_cast<double>(N);
          bwd_mean += col_max / static_cast<double>(N);
        };
        gains_of(Hres, g.forward_max, g.forward_mean, g.backward_max, g.backward_mean);
        gains_of(P, g.composite_forward_max, g.composite_forward_mean, g.composite_backward_max,
                 g.composite_backward_mean);
      }
    }
  }
};

template <typename T> Gpt<T>::Gpt(const ModelConfig& config, int64_t batch, int64_t seq) : config_(config) {
  config_.validate();
  check(batch >= 1, "batch: must be >= 1");
  check(seq >= 1 && seq <= config_.seq_length,
        "seq: must be in [1, seq_length = " + std::to_string(config_.seq_length) + "]");
  s_ = std::make_unique<State>();
  State& s = *s_;
  const ModelConfig& c = config_;
  s.B = batch;
  s.S = seq;
  s.N = batch * seq;
  s.C = c.hidden_size;
  s.n = c.streams();
  s.F = c.ffn_size();
  s.activation = activation_of(c);
  s.width = cpu::activation_input_width(s.activation, s.F);
  s.V = c.vocab_size;
  s.H = c.num_attention_heads;
  s.hc = c.hyper_connections();
  s.rms = c.normalization == "RMSNorm";
  s.recompute = recomputing(c);
  s.plan = RecomputePlan(static_cast<int>(c.num_layers), c.mhc_recompute_layer_num);
  const int64_t N = s.N, C = s.C, n = s.n, bias = c.add_bias_linear ? 1 : 0, norm_bias = s.rms ? 0 : 1;
  const LayerSizes sizes = layer_sizes(c, batch, seq);

  s.wte = Parameter<T>("embedding.word_embeddings.weight", {s.V, C});
  s.wpe = Parameter<T>("embedding.position_embeddings.weight", {c.seq_length, C});
  s.lnf_w = Parameter<T>("decoder.final_layernorm.weight", {C});
  s.lnf_b = Parameter<T>("decoder.final_layernorm.bias", {norm_bias * C});
  const cpu::ResMapping mapping = c.connection == "mhc" ? cpu::ResMapping::Sinkhorn : cpu::ResMapping::Unconstrained;
  s.layers.resize(static_cast<size_t>(c.num_layers));
  if (s.recompute) s.workspace.assign(static_cast<size_t>(s.plan.max_block_size() * sizes.restorable), T(0));
  for (int l = 0; l < c.num_layers; ++l) {
    Layer<T>& L = s.layers[l];
    const std::string p = "decoder.layers." + std::to_string(l) + ".";
    L.ln1_w = Parameter<T>(p + "input_layernorm.weight", {C});
    L.ln1_b = Parameter<T>(p + "input_layernorm.bias", {norm_bias * C});
    L.qkv_w = Parameter<T>(p + "self_attention.linear_qkv.weight", {3 * C, C});
    L.qkv_b = Parameter<T>(p + "self_attention.linear_qkv.bias", {bias * 3 * C});
    L.proj_w = Parameter<T>(p + "self_attention.linear_proj.weight", {C, C});
    L.proj_b = Parameter<T>(p + "self_attention.linear_proj.bias", {bias * C});
    L.ln2_w = Parameter<T>(p + "pre_mlp_layernorm.weight", {C});
    L.ln2_b = Parameter<T>(p + "pre_mlp_layernorm.bias", {norm_bias * C});
    L.fc1_w = Parameter<T>(p + "mlp.linear_fc1.weight", {s.width, C});
    L.fc1_b = Parameter<T>(p + "mlp.linear_fc1.bias", {bias * s.width});
    L.fc2_w = Parameter<T>(p + "mlp.linear_fc2.weight", {C, s.F});
    L.fc2_b = Parameter<T>(p + "mlp.linear_fc2.bias", {bias * C});
    if (s.hc) {
      const int iterations = static_cast<int>(c.mhc_sinkhorn_iterations);
      L.hc_attn = std::make_unique<HyperConnection<T>>(static_cast<int>(n), C, mapping, iterations);
      L.hc_mlp = std::make_unique<HyperConnection<T>>(static_cast<int>(n), C, mapping, iterations);
      for (Parameter<T>* q : L.hc_attn->parameters()) q->name = p + "self_attention_hyper_connection." + q->name;
      for (Parameter<T>* q : L.hc_mlp->parameters()) q->name = p + "mlp_hyper_connection." + q->name;
      L.act_attn.resize(N, static_cast<int>(n));
      L.act_mlp.resize(N, static_cast<int>(n));
    }
    const size_t stats = s.rms ? 0 : static_cast<size_t>(N);
    L.ln1_mean.resize(stats);
    L.ln2_mean.resize(stats);
    L.ln1_rstd.resize(N);
    L.ln2_rstd.resize(N);
    L.qkv.resize(N * 3 * C);
    L.probs.resize(batch * s.H * seq * seq);
    L.ctx.resize(N * C);
    L.attn_y.resize(N * C);
    L.fc.resize(N * s.width);
    L.act.resize(N * s.F);
    L.mlp_y.resize(N * C);
    // Restorable tensors: in this layer's own storage, or in its recompute-workspace slot.
    T* base;
    if (s.recompute) {
      base = s.workspace.data() + s.plan.slot(l) * sizes.restorable;
      if (s.plan.ends_block(l)) L.own.resize(N * n * C);
    } else {
      L.own.resize(sizes.restorable);
      base = L.own.data();
    }
    static_cast<RestorableTensors<T>&>(L) = carve_restorable(base, N, C, n, s.hc);
    if (s.recompute && s.plan.ends_block(l)) L.x_out = L.own.data();
  }
  s.e.resize(N * C);
  s.x0.resize(N * n * C);
  s.h.resize(N * C);
  s.hf.resize(N * C);
  s.lnf_mean.resize(s.rms ? 0 : N);
  s.lnf_rstd.resize(N);
  s.probs.resize(N * s.V);
  s.targets.resize(N);
  s.tokens.resize(N);
  for (auto* v : {&s.dx_a, &s.dx_b, &s.dx_mid}) v->resize(N * n * C);
  for (auto* v : {&s.dagg, &s.dln, &s.dy, &s.dctx, &s.dh, &s.dhf, &s.de}) v->resize(N * C);
  s.dqkv.resize(N * 3 * C);
  s.dfc.resize(N * s.width);
  s.dact.resize(N * s.F);
  if (s.hc) {
    s.composite.resize(N * n * n);
    s.product.resize(n * n);
    s.gains.resize(2 * s.layers.size());
  }
}

template <typename T> Gpt<T>::~Gpt() = default;

template <typename T> void Gpt<T>::init(uint64_t seed) {
  State& s = *s_;
  s.seed = seed;
  const T std_dev = static_cast<T>(config_.init_method_std);
  // Output projections scaled by 1/sqrt(2L), as Megatron's scaled_init_method_normal.
  const T out_std = static_cast<T>(config_.init_method_std / std::sqrt(2.0 * static_cast<double>(config_.num_layers)));
  uint64_t site = 0;
  for (Parameter<T>* p : parameters()) {
    const uint64_t key = rng_key(seed, 0xC0FFEE, site++);
    const std::string& name = p->name;
    auto ends_with = [&name](const std::string& suffix) {
      return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    if (name.find("hyper_connection.") != std::string::npos) continue;  // initialised by the module below
    if (ends_with("layernorm.weight")) std::fill(p->value.begin(), p->value.end(), T(1));
    else if (ends_with(".bias")) std::fill(p->value.begin(), p->value.end(), T(0));
    else if (ends_with("linear_proj.weight") || ends_with("linear_fc2.weight")) p->fill_normal(key, out_std);
    else p->fill_normal(key, std_dev);
  }
  for (size_t l = 0; l < s.layers.size(); ++l)
    if (s.hc) {
      s.layers[l].hc_attn->init(rng_key(seed, 0xACC, 2 * l), config_.mhc_init_gating_factor);
      s.layers[l].hc_mlp->init(rng_key(seed, 0xACC, 2 * l + 1), config_.mhc_init_gating_factor);
    }
}

template <typename T> std::vector<Parameter<T>*> Gpt<T>::parameters() {
  State& s = *s_;
  std::vector<Parameter<T>*> all;
  auto add = [&all](Parameter<T>& p) {
    if (!p.value.empty()) all.push_back(&p);
  };
  add(s.wte);
  add(s.wpe);
  for (Layer<T>& L : s.layers) {
    for (Parameter<T>* p : {&L.ln1_w, &L.ln1_b, &L.qkv_w, &L.qkv_b, &L.proj_w, &L.proj_b, &L.ln2_w, &L.ln2_b,
                            &L.fc1_w, &L.fc1_b, &L.fc2_w, &L.fc2_b})
      add(*p);
    if (s.hc)
      for (HyperConnection<T>* m : {L.hc_attn.get(), L.hc_mlp.get()})
        for (Parameter<T>* p : m->parameters()) add(*p);
  }
  add(s.lnf_w);
  add(s.lnf_b);
  return all;
}

template <typename T> void Gpt<T>::zero_grad() {
  for (Parameter<T>* p : parameters()) p->zero_grad();
}

template <typename T>
double Gpt<T>::forward(const int32_t* tokens, const int32_t* targets, uint64_t step, const T* embeddings) {
  State& s = *s_;
  const ModelConfig& c = config_;
  check_token_ids(tokens, s.N, s.V, "token");
  check_token_ids(targets, s.N, s.V, "target");
  std::copy(tokens, tokens + s.N, s.tokens.begin());
  std::copy(targets, targets + s.N, s.targets.begin());
  s.embeddings_overridden = embeddings != nullptr;
  if (embeddings) std::copy(embeddings, embeddings + s.N * s.C, s.e.begin());
  else cpu::embedding_forward(tokens, s.wte.value.data(), s.wpe.value.data(), s.B, s.S, s.C, s.e.data());
  cpu::stream_expand_forward(s.e.data(), s.N, static_cast<int>(s.n), s.C, s.x0.data());
  for (int l = 0; l < c.num_layers; ++l) {
    Layer<T>& L = s.layers[l];
    const auto hidden_p = s.training ? static_cast<float>(c.hidden_dropout) : 0.0f;
    const auto attention_p = s.training ? static_cast<float>(c.attention_dropout) : 0.0f;
    L.drop_attn = {hidden_p, rng_key(s.seed, l, step, kAttentionResidual)};
    L.drop_mlp = {hidden_p, rng_key(s.seed, l, step, kMlpResidual)};
    L.drop_probs = {attention_p, rng_key(s.seed, l, step, kAttentionProbs)};
    s.layer_forward(L, s.layer_input(l), c);
  }
  cpu::stream_contract_forward(s.layers.back().x_out, s.N, static_cast<int>(s.n), s.C, s.h.data());
  s.norm(s.h.data(), s.lnf_w, s.lnf_b, c, s.hf.data(), s.lnf_mean, s.lnf_rstd);
  const double loss = cpu::lm_head_forward(s.hf.data(), s.wte.value.data(), targets, s.N, s.C, s.V, s.probs.data());
  if (s.hc) s.update_gains();
  return loss;
}

template <typename T> void Gpt<T>::backward() {
  State& s = *s_;
  const ModelConfig& c = config_;
  std::fill(s.dhf.begin(), s.dhf.end(), T(0));
  cpu::lm_head_backward(s.probs.data(), s.hf.data(), s.wte.value.data(), s.targets.data(), s.N, s.C, s.V,
                        s.dhf.data(), s.wte.grad.data());
  std::fill(s.dh.begin(), s.dh.end(), T(0));
  s.norm_backward(s.dhf.data(), s.h.data(), s.lnf_w, s.lnf_b, s.lnf_mean, s.lnf_rstd, s.dh.data());
  cpu::stream_contract_backward(s.dh.data(), s.N, static_cast<int>(s.n), s.C, s.dx_a.data());
  T* grad_out = s.dx_a.data();
  T* grad_in = s.dx_b.data();
  for (int l = static_cast<int>(c.num_layers) - 1; l >= 0; --l) {
    if (s.recompute && s.plan.ends_block(l)) {
      const RecomputeBlock& block = s.plan.block_of(l);
      for (int k = block.first; k <= block.last; ++k)
        s.restore(s.layers[k], s.layer_input(k), c, /*with_output=*/k != block.last);
    }
    s.layer_backward(s.layers[l], s.layer_input(l), grad_out, grad_in, s.dx_mid.data());
    std::swap(grad_out, grad_in);
  }
  cpu::stream_expand_backward(grad_out, s.N, static_cast<int>(s.n), s.C, s.de.data());
  if (!s.embeddings_overridden)
    cpu::embedding_backward(s.de.data(), s.tokens.data(), s.B, s.S, s.C, s.wte.grad.data(), s.wpe.grad.data());
}

template <typename T> void Gpt<T>::set_training(bool training) { s_->training = training; }

template <typename T> std::unique_ptr<typename Gpt<T>::DecodeCache> Gpt<T>::make_decode_cache() const {
  const State& s = *s_;
  auto cache = std::make_unique<DecodeCache>();
  const int64_t C = s.C, n = s.n;
  cache->keys.assign(s.layers.size(), std::vector<T>(config_.seq_length * C));
  cache->values.assign(s.layers.size(), std::vector<T>(config_.seq_length * C));
  cache->act_attn.resize(s.layers.size());
  cache->act_mlp.resize(s.layers.size());
  for (auto* v : {&cache->e, &cache->agg, &cache->ln, &cache->ctx, &cache->y, &cache->mlp_y, &cache->h, &cache->hf})
    v->resize(C);
  for (auto* v : {&cache->x, &cache->x_mid}) v->resize(n * C);
  cache->mean.resize(1);
  cache->rstd.resize(1);
  cache->qkv.resize(3 * C);
  cache->fc.resize(s.width);
  cache->act.resize(s.F);
  return cache;
}

template <typename T>
void Gpt<T>::decode(DecodeCache& k, int32_t token, int64_t position, std::vector<T>& logits) {
  State& s = *s_;
  const ModelConfig& c = config_;
  check(token >= 0 && token < s.V, "token id " + std::to_string(token) + " outside the vocabulary");
  check(position >= 0 && position < c.seq_length,
        "position " + std::to_string(position) + " outside [0, seq_length = " + std::to_string(c.seq_length) + ")");
  const int64_t C = s.C;
  const int n = static_cast<int>(s.n);
  const bool rms = s.rms;
  auto norm = [&](const T* in, Parameter<T>& w, Parameter<T>& b, T* out) {
    cpu::norm_forward(in, w.value.data(), State::ptr(b), 1, C, c.layernorm_epsilon, rms, out,
                      rms ? nullptr : k.mean.data(), k.rstd.data());
  };
  for (int64_t i = 0; i < C; ++i) k.e[i] = s.wte.value[token * C + i] + s.wpe.value[position * C + i];
  cpu::stream_expand_forward(k.e.data(), 1, n, C, k.x.data());
  for (size_t l = 0; l < s.layers.size(); ++l) {
    Layer<T>& L = s.layers[l];
    const T* norm1_in = k.x.data();
    if (s.hc) {
      L.hc_attn->forward(k.x.data(), 1, k.act_attn[l], k.agg.data());
      norm1_in = k.agg.data();
    }
    norm(norm1_in, L.ln1_w, L.ln1_b, k.ln.data());
    cpu::linear_forward(k.ln.data(), L.qkv_w.value.data(), State::ptr(L.qkv_b), 1, C, 3 * C, k.qkv.data());
    std::copy_n(k.qkv.data() + C, C, k.keys[l].data() + position * C);
    std::copy_n(k.qkv.data() + 2 * C, C, k.values[l].data() + position * C);
    cpu::attention_decode(k.qkv.data(), k.keys[l].data(), k.values[l].data(), position, s.H, C, k.ctx.data());
    cpu::linear_forward<T>(k.ctx.data(), L.proj_w.value.data(), nullptr, 1, C, C, k.y.data());
    if (s.hc) L.hc_attn->residual_forward(k.x.data(), k.act_attn[l], k.y.data(), State::ptr(L.proj_b), {}, k.x_mid.data());
    else cpu::h_post_bda_forward<T>(k.x.data(), nullptr, nullptr, k.y.data(), State::ptr(L.proj_b), 1, 1, C, {}, k.x_mid.data());
    const T* norm2_in = k.x_mid.data();
    if (s.hc) {
      L.hc_mlp->forward(k.x_mid.data(), 1, k.act_mlp[l], k.agg.data());
      norm2_in = k.agg.data();
    }
    norm(norm2_in, L.ln2_w, L.ln2_b, k.ln.data());
    cpu::linear_forward(k.ln.data(), L.fc1_w.value.data(), State::ptr(L.fc1_b), 1, C, s.width, k.fc.data());
    cpu::activation_forward(s.activation, k.fc.data(), 1, s.F, k.act.data());
    cpu::linear_forward<T>(k.act.data(), L.fc2_w.value.data(), nullptr, 1, s.F, C, k.mlp_y.data());
    if (s.hc) L.hc_mlp->residual_forward(k.x_mid.data(), k.act_mlp[l], k.mlp_y.data(), State::ptr(L.fc2_b), {}, k.x.data());
    else cpu::h_post_bda_forward<T>(k.x_mid.data(), nullptr, nullptr, k.mlp_y.data(), State::ptr(L.fc2_b), 1, 1, C, {}, k.x.data());
  }
  cpu::stream_contract_forward(k.x.data(), 1, n, C, k.h.data());
  norm(k.h.data(), s.lnf_w, s.lnf_b, k.hf.data());
  logits.resize(static_cast<size_t>(s.V));
  cpu::linear_forward<T>(k.hf.data(), s.wte.value.data(), nullptr, 1, C, s.V, logits.data());
}

template <typename T> const std::vector<T>& Gpt<T>::probabilities() const { return s_->probs; }
template <typename T> const std::vector<T>& Gpt<T>::embeddings() const { return s_->e; }
template <typename T> const std::vector<T>& Gpt<T>::grad_embeddings() const { return s_->de; }
template <typename T> const std::vector<GainStats>& Gpt<T>::gains() const { return s_->gains; }

template <typename T> ActivationBytes Gpt<T>::bytes() const {
  return activation_bytes(config_, s_->B, s_->S, sizeof(T));
}

template class Gpt<float>;
template class Gpt<double>;

}  // namespace mhc
