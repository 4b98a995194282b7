// The GPT shape the benches take (defaults: GPT-2 small), its command-line options and the
// model config fields it sets.
#pragma once
#include <CLI/CLI.hpp>
#include <cstdint>

#include "apps/mhc/commands.h"
#include "core/config.h"

namespace mhc::app {

struct GptShape {
  int64_t layers = 12, hidden = 768, heads = 12, seq = 1024, batch = 16, streams = 4, vocab = 50304;

  void add_options(CLI::App* cmd) {
    cmd->add_option("--layers", layers, "transformer layers")->check(at_least(1, true))->capture_default_str();
    cmd->add_option("--hidden", hidden, "hidden size C")->check(at_least(1, true))->capture_default_str();
    cmd->add_option("--heads", heads, "attention heads")->check(at_least(1, true))->capture_default_str();
    cmd->add_option("--seq", seq, "sequence length T")->check(at_least(1, true))->capture_default_str();
    cmd->add_option("--batch", batch, "micro-batch size")->check(at_least(1, true))->capture_default_str();
    cmd->add_option("--streams", streams, "residual streams n of mHC")->check(at_least(1, true))->capture_default_str();
    cmd->add_option("--vocab", vocab, "vocabulary size")->check(at_least(1, true))->capture_default_str();
  }
  // Everything but the batch, which is not a model field.
  void apply(ModelConfig& m) const {
    m.num_layers = layers;
    m.hidden_size = hidden;
    m.num_attention_heads = heads;
    m.seq_length = seq;
    m.vocab_size = vocab;
    m.num_residual_streams = streams;
  }
};

}  // namespace mhc::app
