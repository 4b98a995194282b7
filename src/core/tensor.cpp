#include "core/tensor.h"

#include <bit>
#include <cmath>
#include <cstring>

#include "core/error.h"

namespace mhc {

namespace {
struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t size;
  bool is_float;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::F64, "F64", 8, true},  {DType::F32, "F32", 4, true}, {DType::BF16, "BF16", 2, true},
    {DType::F16, "F16", 2, true},  {DType::I64, "I64", 8, false}, {DType::I32, "I32", 4, false},
    {DType::U16, "U16", 2, false}, {DType::U8, "U8", 1, false},
};
const DTypeInfo& info(DType dtype) {
  for (const auto& entry : kDTypes)
    if (entry.dtype == dtype) return entry;
  fail("unknown dtype");
}
}  // namespace

size_t dtype_size(DType dtype) { return info(dtype).size; }
const char* dtype_name(DType dtype) { return info(dtype).name; }
bool dtype_is_float(DType dtype) { return info(dtype).is_float; }

bool parse_dtype(const std::string& name, DType& out) {
  for (const auto& entry : kDTypes)
    if (name == entry.name) {
      out = entry.dtype;
      return true;
    }
  return false;
}

float bf16_to_float(uint16_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

uint16_t float_to_bf16(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x40);
  const uint32_t rounding = 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float f16_to_float(uint16_t bits) {
  const uint32_t sign = (bits >> 15) & 1, exponent = (bits >> 10) & 0x1F, mantissa = bits & 0x3FF;
  float magnitude;
  if (exponent == 0) magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  else if (exponent == 31) magnitude = mantissa ? NAN : INFINITY;
  else magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), static_cast<int>(exponent) - 25);
  return sign ? -magnitude : magnitude;
}

int64_t shape_numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t HostTensor::numel() const { return shape_numel(shape); }

std::string HostTensor::shape_string() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

template <typename T> std::vector<T> HostTensor::to_vector() const {
  const int64_t n = numel();
  check(bytes.size() == static_cast<size_t>(n) * dtype_size(dtype), "tensor byte size does not match its shape");
  std::vector<T> out(static_cast<size_t>(n));
  auto load = [&](auto tag, auto convert) {
    using Stored = decltype(tag);
    for (int64_t i = 0; i < n; ++i) {
      Stored v;
      std::memcpy(&v, bytes.data() + i * sizeof(Stored), sizeof(Stored));
      out[i] = static_cast<T>(convert(v));
    }
  };
  switch (dtype) {
    case DType::F64: load(double{}, [](double v) { return v; }); break;
    case DType::F32: load(float{}, [](float v) { return v; }); break;
    case DType::BF16: load(uint16_t{}, bf16_to_float); break;
    case DType::F16: load(uint16_t{}, f16_to_float); break;
    default: fail(std::string("tensor of dtype ") + dtype_name(dtype) + " where a floating dtype is needed");
  }
  return out;
}

template <typename T>
HostTensor HostTensor::from_values(DType dtype, std::vector<int64_t> shape, const std::vector<T>& values) {
  HostTensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  check(static_cast<int64_t>(values.size()) == t.numel(), "value count does not match shape " + t.shape_string());
  t.bytes.resize(values.size() * dtype_size(dtype));
  auto store = [&](auto convert) {
    for (size_t i = 0; i < values.size(); ++i) {
      auto v = convert(values[i]);
      std::memcpy(t.bytes.data() + i * sizeof(v), &v, sizeof(v));
    }
  };
  switch (dtype) {
    case DType::F64: store([](T v) { return static_cast<double>(v); }); break;
    case DType::F32: store([](T v) { return static_cast<float>(v); }); break;
    case DType::BF16: store([](T v) { return float_to_bf16(static_cast<float>(v)); }); break;
    case DType::I64: store([](T v) { return static_cast<int64_t>(v); }); break;
    case DType::I32: store([](T v) { return static_cast<int32_t>(v); }); break;
    case DType::U16: store([](T v) { return static_cast<uint16_t>(v); }); break;
    case DType::U8: store([](T v) { return static_cast<uint8_t>(v); }); break;
    default: fail(std::string("cannot store values as ") + dtype_name(dtype));
  }
  return t;
}

template std::vector<float> HostTensor::to_vector<float>() const;
template std::vector<double> HostTensor::to_vector<double>() const;
template HostTensor HostTensor::from_values<float>(DType, std::vector<int64_t>, const std::vector<float>&);
template HostTensor HostTensor::from_values<double>(DType, std::vector<int64_t>, const std::vector<double>&);
template HostTensor HostTensor::from_values<int64_t>(DType, std::vector<int64_t>, const std::vector<int64_t>&);

}  // namespace mhc
