#include "train/data.h"

#include <glob.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "train/corpus.h"

namespace mhc {

namespace {

constexpr int32_t kShardMagic = 20240520, kShardVersion = 1;
constexpr int64_t kBuiltinBytes = 4 << 20;

void split_tail(std::vector<int32_t>& all, Dataset& d) {
  const size_t cut = all.size() - all.size() / 10;
  d.val.assign(all.begin() + static_cast<ptrdiff_t>(cut), all.end());
  all.resize(cut);
  d.train = std::move(all);
}

std::vector<std::string> shard_paths(const std::string& spec) {
  std::vector<std::string> paths;
  if (std::filesystem::is_directory(spec)) {
    for (const auto& entry : std::filesystem::directory_iterator(spec))
      if (entry.path().extension() == ".bin") paths.push_back(entry.path().string());
  } else {
    glob_t g{};
    if (::glob(spec.c_str(), 0, nullptr, &g) == 0)
      for (size_t i = 0; i < g.gl_pathc; ++i) paths.emplace_back(g.gl_pathv[i]);
    globfree(&g);
  }
  std::sort(paths.begin(), paths.end());
  return paths;
}

}  // namespace

std::vector<int32_t> read_bin_shard(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  check(in.good(), path + ": cannot open: " + std::strerror(errno));
  int32_t header[256];
  in.read(reinterpret_cast<char*>(header), sizeof(header));
  check(in.gcount() == sizeof(header), path + ": shorter than the 1024-byte shard header");
  check(header[0] == kShardMagic, path + ": not an llm.c token shard (magic " + std::to_string(header[0]) +
                                      ", expected " + std::to_string(kShardMagic) + ")");
  check(header[1] == kShardVersion, path + ": shard version " + std::to_string(header[1]) + ", expected 1 (uint16)");
  check(header[2] >= 0, path + ": negative token count");
  std::vector<uint16_t> raw(static_cast<size_t>(header[2]));
  in.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(raw.size() * sizeof(uint16_t)));
  check(in.gcount() == static_cast<std::streamsize>(raw.size() * sizeof(uint16_t)),
        path + ": header announces " + std::to_string(header[2]) + " tokens but the file is shorter (truncated?)");
  return {raw.begin(), raw.end()};
}

void write_bin_shard(const std::string& path, const std::vector<uint16_t>& tokens) {
  int32_t header[256] = {};
  header[0] = kShardMagic;
  header[1] = kShardVersion;
  header[2] = static_cast<int32_t>(tokens.size());
  std::ofstream out(path, std::ios::binary);
  check(out.good(), path + ": cannot create");
  out.write(reinterpret_cast<const char*>(header), sizeof(header));
  out.write(reinterpret_cast<const char*>(tokens.data()), static_cast<std::streamsize>(tokens.size() * 2));
  check(out.good(), path + ": write failed");
}

Dataset load_dataset(const std::string& spec, uint64_t seed) {
  Dataset d;
  if (spec.empty()) {
    const std::string text = builtin_corpus(seed, kBuiltinBytes);
    std::vector<int32_t> all(text.begin(), text.end());
    for (int32_t& t : all) t &= 0xFF;
    split_tail(all, d);
    d.description = "built-in corpus (arithmetic, key-value recall, grammar; byte tokens)";
  } else if (std::filesystem::is_regular_file(spec) && std::filesystem::path(spec).extension() != ".bin") {
    std::ifstream in(spec, std::ios::binary);
    check(in.good(), spec + ": cannot open: " + std::strerror(errno));
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    check(!text.empty(), spec + ": the data file is empty");
    std::vector<int32_t> all;
    all.reserve(text.size());
    for (unsigned char c : text) all.push_back(c);
    split_tail(all, d);
    d.description = "text file " + spec + " (byte tokens)";
  } else {
    const auto paths = shard_paths(spec);
    check(!paths.empty(), spec + ": no such file, and no .bin shard matches");
    std::vector<int32_t> train, val;
    for (const std::string& p : paths) {
      auto tokens = read_bin_shard(p);
      auto& target = std::filesystem::path(p).filename().string().find("val") != std::string::npos ? val : train;
      target.insert(target.end(), tokens.begin(), tokens.end());
    }
    check(!train.empty(), spec + ": the shards hold no training tokens");
    if (val.empty()) {
      split_tail(train, d);
    } else {
      d.train = std::move(train);
      d.val = std::move(val);
    }
    d.description = std::to_string(paths.size()) + " token shard(s) from " + spec;
  }
  for (int32_t t : d.train) d.max_token = std::max(d.max_token, t);
  for (int32_t t : d.val) d.max_token = std::max(d.max_token, t);
  return d;
}

Batcher::Batcher(const std::vector<int32_t>& stream, int64_t batch, int64_t seq)
    : stream_(stream), batch_(batch), seq_(seq), windows_(static_cast<int64_t>(stream.size()) - seq) {
  check(windows_ >= 1, "data: " + std::to_string(stream.size()) + " tokens are too few for seq_length " +
                           std::to_string(seq) + " (need at least seq_length + 1)");
}

void Batcher::next(uint64_t& position, int32_t* tokens, int32_t* targets) const {
  for (int64_t b = 0; b < batch_; ++b) {
    const auto start = static_cast<int64_t>(position % static_cast<uint64_t>(windows_));
    std::copy_n(stream_.begin() + start, seq_, tokens + b * seq_);
    std::copy_n(stream_.begin() + start + 1, seq_, targets + b * seq_);
    position += static_cast<uint64_t>(seq_);
  }
}

}  // namespace mhc
