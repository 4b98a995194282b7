#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace mhc {

namespace {
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // the format's own limit

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

void write_u64_le(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

uint64_t json_unsigned(const nlohmann::json& value, const std::string& what) {
  check(value.is_number_unsigned() || (value.is_number_integer() && value.get<int64_t>() >= 0),
        what + " is not a non-negative integer");
  return value.get<uint64_t>();
}
}  // namespace

const HostTensor& Safetensors::at(const std::string& name) const {
  auto it = tensors.find(name);
  check(it != tensors.end(), "missing tensor '" + name + "'");
  return it->second;
}

namespace {
struct DataRange {
  std::string name;
  uint64_t begin, end;
};

// The header's length from the file's first 8 bytes, checked against the file's size.
uint64_t header_length(std::span<const uint8_t> first, uint64_t file_size, const std::string& where) {
  check(file_size >= 8,
        where + "file is " + std::to_string(file_size) + " bytes, too short for the 8-byte header length");
  const uint64_t header_len = read_u64_le(first.data());
  check(header_len <= kMaxHeaderBytes, where + "header length " + std::to_string(header_len) + " is implausible");
  check(header_len <= file_size - 8, where + "header length " + std::to_string(header_len) +
                                         " runs past the end of the file (" + std::to_string(file_size) +
                                         " bytes): truncated?");
  return header_len;
}

// The tensors (dtype and shape; their bytes left empty) and metadata of a JSON header, and
// each tensor's range of the `data_size` data bytes in the order they lie, all checked.
Safetensors parse_header(std::span<const uint8_t> text, uint64_t data_size, const std::string& where,
                         std::vector<DataRange>& ranges) {
  const char* header_begin = reinterpret_cast<const char*>(text.data());
  const nlohmann::json header = nlohmann::json::parse(header_begin, header_begin + text.size(), nullptr, false);
  check(!header.is_discarded(), where + "header is not valid JSON");
  check(header.is_object(), where + "header is not a JSON object");
  Safetensors file;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      check(entry.is_object(), where + "__metadata__ is not an object");
      for (const auto& [key, value] : entry.items()) {
        check(value.is_string(), where + "metadata value '" + key + "' is not a string");
        file.metadata[key] = value.get<std::string>();
      }
      continue;
    }
    const std::string tensor_where = where + "tensor '" + name + "': ";
    check(entry.is_object(), tensor_where + "entry is not an object");
    check(entry.contains("dtype") && entry["dtype"].is_string(), tensor_where + "missing dtype");
    check(entry.contains("shape") && entry["shape"].is_array(), tensor_where + "missing shape");
    check(entry.contains("data_offsets") && entry["data_offsets"].is_array() && entry["data_offsets"].size() == 2,
          tensor_where + "data_offsets is not a pair");
    HostTensor tensor;
    check(parse_dtype(entry["dtype"].get<std::string>(), tensor.dtype),
          tensor_where + "unsupported dtype '" + entry["dtype"].get<std::string>() + "'");
    const uint64_t element_size = dtype_size(tensor.dtype);
    uint64_t numel = 1;
    for (const auto& dim : entry["shape"]) {
      const uint64_t d = json_unsigned(dim, tensor_where + "a shape entry");
      check(d == 0 || numel <= (std::numeric_limits<uint64_t>::max() / 16) / d, tensor_where + "shape overflows");
      numel *= d;
      tensor.shape.push_back(static_cast<int64_t>(d));
    }
    const uint64_t begin = json_unsigned(entry["data_offsets"][0], tensor_where + "data_offsets[0]");
    const uint64_t end = json_unsigned(entry["data_offsets"][1], tensor_where + "data_offsets[1]");
    check(begin <= end && end <= data_size, tensor_where + "data_offsets [" + std::to_string(begin) + ", " +
                                                std::to_string(end) + "] outside the " + std::to_string(data_size) +
                                                " data bytes: truncated?");
    check(end - begin == numel * element_size,
          tensor_where + "holds " + std::to_string(end - begin) + " bytes but shape " + tensor.shape_string() +
              " of " + dtype_name(tensor.dtype) + " needs " + std::to_string(numel * element_size));
    ranges.push_back({name, begin, end});
    file.tensors.emplace(name, std::move(tensor));
  }
  std::sort(ranges.begin(), ranges.end(), [](const DataRange& x, const DataRange& y) { return x.begin < y.begin; });
  for (size_t i = 1; i < ranges.size(); ++i)
    check(ranges[i].begin >= ranges[i - 1].end, where + "tensor data ranges overlap");
  return file;
}
}  // namespace

Safetensors parse_safetensors(std::span<const uint8_t> bytes, const std::string& origin) {
  const std::string where = origin + ": ";
  const uint64_t header_len = header_length(bytes, bytes.size(), where);
  std::vector<DataRange> ranges;
  Safetensors file = parse_header(bytes.subspan(8, header_len), bytes.size() - 8 - header_len, where, ranges);
  const std::span<const uint8_t> data = bytes.subspan(8 + header_len);
  for (const DataRange& r : ranges)
    file.tensors[r.name].bytes.assign(data.begin() + static_cast<ptrdiff_t>(r.begin),
                                      data.begin() + static_cast<ptrdiff_t>(r.end));
  return file;
}

namespace {
TensorViews views_of(const Safetensors& file) {
  TensorViews views;
  for (const auto& [name, tensor] : file.tensors) views[name] = {tensor.dtype, tensor.shape, tensor.bytes};
  return views;
}

// The 8-byte length and the JSON header, padded so that the data starts 8-byte aligned;
// the tensors' data follows in name order.
std::string header_of(const TensorViews& tensors, const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    check(tensor.bytes.size() == static_cast<size_t>(shape_numel(tensor.shape)) * dtype_size(tensor.dtype),
          "tensor '" + name + "' byte size does not match its shape");
    header[name] = {{"dtype", dtype_name(tensor.dtype)},
                    {"shape", tensor.shape},
                    {"data_offsets", {offset, offset + tensor.bytes.size()}}};
    offset += tensor.bytes.size();
  }
  std::string text = header.dump();
  text.resize((text.size() + 7) / 8 * 8, ' ');
  std::string out(8, '\0');
  write_u64_le(reinterpret_cast<uint8_t*>(out.data()), text.size());
  return out + text;
}
}  // namespace

std::vector<uint8_t> serialize_safetensors(const Safetensors& file) {
  const TensorViews tensors = views_of(file);
  const std::string header = header_of(tensors, file.metadata);
  std::vector<uint8_t> out(header.begin(), header.end());
  for (const auto& [name, tensor] : tensors) out.insert(out.end(), tensor.bytes.begin(), tensor.bytes.end());
  return out;
}

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
  std::error_code ignored;
  check(!std::filesystem::is_directory(path, ignored), path + ": is a directory, not a .safetensors file");
  fd_ = ::open(path.c_str(), O_RDONLY);
  check(fd_ >= 0, path + ": cannot open: " + std::strerror(errno));
  try {
    struct stat info {};
    check(::fstat(fd_, &info) == 0, path + ": cannot stat: " + std::strerror(errno));
    const auto file_size = static_cast<uint64_t>(info.st_size);
    const std::string where = path + ": ";
    uint8_t first[8] = {};
    read_at(first, std::min<uint64_t>(8, file_size), 0);
    const uint64_t header_len = header_length(first, file_size, where);
    std::vector<uint8_t> text(header_len);
    read_at(text.data(), header_len, 8);
    std::vector<DataRange> ranges;
    header_ = parse_header(text, file_size - 8 - header_len, where, ranges);
    for (const DataRange& r : ranges) ranges_[r.name] = {r.begin, r.end};
    data_start_ = 8 + header_len;
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

SafetensorsReader::~SafetensorsReader() { ::close(fd_); }

void SafetensorsReader::read_at(uint8_t* to, uint64_t size, uint64_t offset) const {
  for (uint64_t done = 0; done < size;) {
    const ssize_t n = ::pread(fd_, to + done, size - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    check(n > 0, path_ + ": read error: " + (n == 0 ? std::string("the file shrank") : std::strerror(errno)));
    done += static_cast<uint64_t>(n);
  }
}

void SafetensorsReader::read(const std::string& name, std::span<uint8_t> out) const {
  const auto it = ranges_.find(name);
  check(it != ranges_.end(), path_ + ": missing tensor '" + name + "'");
  const Range r = it->second;
  check(out.size() == r.end - r.begin, path_ + ": tensor '" + name + "' holds " + std::to_string(r.end - r.begin) +
                                           " bytes, read into " + std::to_string(out.size()));
  read_at(out.data(), out.size(), data_start_ + r.begin);
}

HostTensor SafetensorsReader::read(const std::string& name) const {
  HostTensor t = tensor(name);
  t.bytes.resize(static_cast<size_t>(t.numel()) * dtype_size(t.dtype));
  read(name, t.bytes);
  return t;
}

// The header, then each tensor's bytes straight into its HostTensor: the file is never
// held in memory whole.
Safetensors read_safetensors(const std::string& path) {
  const SafetensorsReader reader(path);
  Safetensors file;
  file.metadata = reader.metadata();
  for (const auto& [name, info] : reader.tensors()) file.tensors.emplace(name, reader.read(name));
  return file;
}

std::map<std::string, std::string> read_safetensors_metadata(const std::string& path) {
  return SafetensorsReader(path).metadata();
}

void write_safetensors(const std::string& path, const TensorViews& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::string header = header_of(tensors, metadata);
  const std::string temporary = path + ".tmp." + std::to_string(getpid());
  const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  check(fd >= 0, temporary + ": cannot create: " + std::strerror(errno));
  auto write_all = [&](const void* data, size_t size) {
    const auto* bytes = static_cast<const uint8_t*>(data);
    for (size_t written = 0; written < size;) {
      const ssize_t n = ::write(fd, bytes + written, size - written);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        const std::string reason = std::strerror(errno);
        ::close(fd);
        ::unlink(temporary.c_str());
        fail(temporary + ": write failed: " + reason);
      }
      written += static_cast<size_t>(n);
    }
  };
  write_all(header.data(), header.size());
  for (const auto& [name, tensor] : tensors) write_all(tensor.bytes.data(), tensor.bytes.size());
  const bool synced = ::fsync(fd) == 0;
  ::close(fd);
  if (!synced || std::rename(temporary.c_str(), path.c_str()) != 0) {
    const std::string reason = std::strerror(errno);
    ::unlink(temporary.c_str());
    fail(path + ": cannot commit checkpoint file: " + reason);
  }
  const std::string dir = std::filesystem::absolute(path).parent_path().string();
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dir_fd >= 0) {  // make the rename itself durable
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
}

void write_safetensors(const std::string& path, const Safetensors& file) {
  write_safetensors(path, views_of(file), file.metadata);
}

}  // namespace mhc
