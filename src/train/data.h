// Training data: token streams for a train and a validation split, and the batcher that
// walks them deterministically (its position is saved in checkpoints).
//
// Sources: the built-in corpus (no --data), a UTF-8 text file (byte tokens, vocabulary
// 256), or pre-tokenized llm.c shards (a directory or a glob of `.bin` files: a 256 x int32
// header with magic 20240520 and version 1, header[2] tokens, then uint16 tokens; shards
// whose name contains "val" form the validation split). Without a validation shard, and
// for text, the last 10% is held out.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mhc {

struct Dataset {
  std::vector<int32_t> train, val;
  std::string description;  // for logs and reports
  int32_t max_token = 0;
};

// `spec` empty: the built-in corpus. Errors name the file or pattern and the problem.
Dataset load_dataset(const std::string& spec, uint64_t seed);
std::vector<int32_t> read_bin_shard(const std::string& path);
void write_bin_shard(const std::string& path, const std::vector<uint16_t>& tokens);  // for tests and tools

// B windows of T+1 tokens from `position` onward (wrapping), as tokens and targets.
class Batcher {
 public:
  Batcher(const std::vector<int32_t>& stream, int64_t batch, int64_t seq);
  void next(uint64_t& position, int32_t* tokens, int32_t* targets) const;
  int64_t windows() const { return windows_; }

 private:
  const std::vector<int32_t>& stream_;
  int64_t batch_, seq_, windows_;
};

}  // namespace mhc
