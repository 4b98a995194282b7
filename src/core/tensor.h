// Host tensors: a dtype, a shape and the raw little-endian bytes. This is the exchange
// format of checkpoints and reference files; compute code works on typed spans of it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mhc {

enum class DType { F64, F32, BF16, F16, I64, I32, U16, U8 };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);          // safetensors spelling: "F64", "BF16", ...
bool parse_dtype(const std::string& name, DType& out);
bool dtype_is_float(DType dtype);

float bf16_to_float(uint16_t bits);
uint16_t float_to_bf16(float value);  // round to nearest even; NaN stays NaN
float f16_to_float(uint16_t bits);

struct HostTensor {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;

  int64_t numel() const;
  std::string shape_string() const;  // "[8, 2, 256]"

  // Values converted to T (from any floating dtype); throws for integer dtypes.
  template <typename T> std::vector<T> to_vector() const;
  // A tensor of `dtype` holding `values` (converted, bf16 rounded to nearest even).
  template <typename T>
  static HostTensor from_values(DType dtype, std::vector<int64_t> shape, const std::vector<T>& values);
};

int64_t shape_numel(const std::vector<int64_t>& shape);

}  // namespace mhc
