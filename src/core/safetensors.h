// safetensors: 8-byte little-endian header length N, N bytes of JSON header
// ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}), then
// the raw data. Reading checks every length, offset and shape against the bytes actually
// present, so a truncated or malformed file is an Error naming the file, never a crash.
#pragma once
#include <cstdint>
#include <map>
#include <span>
#include <string>

#include "core/tensor.h"

namespace mhc {

struct Safetensors {
  std::map<std::string, HostTensor> tensors;
  std::map<std::string, std::string> metadata;

  bool has(const std::string& name) const { return tensors.count(name) != 0; }
  const HostTensor& at(const std::string& name) const;  // Error naming the missing tensor
};

// A tensor to write whose bytes stay where they are (the caller's memory), so that a
// checkpoint is written without a copy of the model.
struct TensorView {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::span<const uint8_t> bytes;
};
using TensorViews = std::map<std::string, TensorView>;

// `origin` names the source (usually the path) in error messages.
Safetensors parse_safetensors(std::span<const uint8_t> bytes, const std::string& origin);
std::vector<uint8_t> serialize_safetensors(const Safetensors& file);

Safetensors read_safetensors(const std::string& path);
// The header's metadata alone (the whole header checked, no tensor read).
std::map<std::string, std::string> read_safetensors_metadata(const std::string& path);

// A file opened for reading its tensors one at a time, each straight into the caller's
// memory (a checkpoint loads into the model without a copy of the file): the header is
// read and checked whole when it opens.
class SafetensorsReader {
 public:
  explicit SafetensorsReader(const std::string& path);
  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  // Every tensor's dtype and shape, their bytes empty.
  const std::map<std::string, HostTensor>& tensors() const { return header_.tensors; }
  bool has(const std::string& name) const { return header_.has(name); }
  // The tensor's dtype and shape, its bytes empty (Error naming a missing tensor).
  const HostTensor& tensor(const std::string& name) const { return header_.at(name); }
  // The tensor's bytes into `out`, which must be exactly their size.
  void read(const std::string& name, std::span<uint8_t> out) const;
  // The whole tensor, its bytes read into a HostTensor of its own.
  HostTensor read(const std::string& name) const;

 private:
  struct Range {
    uint64_t begin, end;
  };
  void read_at(uint8_t* to, uint64_t size, uint64_t offset) const;

  std::string path_;
  int fd_ = -1;
  Safetensors header_;                   // the tensors' dtypes and shapes, and the metadata
  std::map<std::string, Range> ranges_;  // within the data, which starts at data_start_
  uint64_t data_start_ = 0;
};
// Atomic: writes a temporary file beside `path` (the header, then each tensor's bytes from
// where they lie), fsyncs it, then renames it over `path`. The same bytes as
// serialize_safetensors.
void write_safetensors(const std::string& path, const TensorViews& tensors,
                       const std::map<std::string, std::string>& metadata);
void write_safetensors(const std::string& path, const Safetensors& file);

}  // namespace mhc
