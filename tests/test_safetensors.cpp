#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "core/error.h"
#include "core/safetensors.h"

namespace mhc {
namespace {

Safetensors sample_file() {
  Safetensors f;
  f.metadata["kind"] = "test";
  f.tensors["a.f64"] = HostTensor::from_values<double>(DType::F64, {2, 3}, {1, -2, 3.5, 4, 5e-300, -6e300});
  f.tensors["b.f32"] = HostTensor::from_values<float>(DType::F32, {4}, {0.25f, -1.5f, 3e10f, 7});
  f.tensors["c.bf16"] = HostTensor::from_values<float>(DType::BF16, {3}, {1.0f, -2.5f, 0.1f});
  f.tensors["d.i64"] = HostTensor::from_values<int64_t>(DType::I64, {2}, {42, -7});
  f.tensors["e.empty"] = HostTensor::from_values<float>(DType::F32, {0, 5}, {});
  return f;
}

// A file of this test process's own (ctest runs tests in parallel processes: a shared name
// let one test's writes land in another's reads).
std::string scratch_path(const std::string& what) {
  const std::string name = "mhc_test_" + std::to_string(::getpid()) + "_" + what + ".safetensors";
  return (std::filesystem::temp_directory_path() / name).string();
}

TEST(Safetensors, RoundTripInMemoryAndOnDisk) {
  const Safetensors f = sample_file();
  const auto bytes = serialize_safetensors(f);
  const Safetensors back = parse_safetensors(bytes, "memory");
  EXPECT_EQ(back.metadata, f.metadata);
  ASSERT_EQ(back.tensors.size(), f.tensors.size());
  for (const auto& [name, t] : f.tensors) {
    EXPECT_EQ(back.at(name).dtype, t.dtype) << name;
    EXPECT_EQ(back.at(name).shape, t.shape) << name;
    EXPECT_EQ(back.at(name).bytes, t.bytes) << name;
  }
  const auto path = scratch_path("roundtrip");
  write_safetensors(path, f);
  EXPECT_EQ(serialize_safetensors(read_safetensors(path)), bytes);
  EXPECT_EQ(read_safetensors_metadata(path), f.metadata);
  std::filesystem::remove(path);
}

// One tensor at a time into the caller's memory: the bytes of the file's tensor, the
// size of the destination checked, a missing tensor named.
TEST(Safetensors, ReaderReadsATensorIntoTheCallersMemory) {
  const Safetensors f = sample_file();
  const auto path = scratch_path("reader");
  write_safetensors(path, f);
  const SafetensorsReader reader(path);
  EXPECT_EQ(reader.metadata(), f.metadata);
  ASSERT_EQ(reader.tensors().size(), f.tensors.size());
  EXPECT_EQ(reader.tensor("b.f32").shape, f.at("b.f32").shape);
  EXPECT_TRUE(reader.tensor("b.f32").bytes.empty());
  std::vector<uint8_t> out(f.at("b.f32").bytes.size());
  reader.read("b.f32", out);
  EXPECT_EQ(out, f.at("b.f32").bytes);
  std::vector<uint8_t> wrong(out.size() - 1);
  try {
    reader.read("b.f32", wrong);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'b.f32' holds 16 bytes, read into 15"), std::string::npos) << e.what();
  }
  EXPECT_THROW(reader.read("absent", out), Error);
  EXPECT_THROW((void)reader.tensor("absent"), Error);
  std::filesystem::remove(path);
}

TEST(Safetensors, ValuesConvert) {
  const Safetensors f = sample_file();
  EXPECT_EQ(f.at("a.f64").to_vector<double>()[5], -6e300);
  EXPECT_EQ(f.at("b.f32").to_vector<double>()[1], -1.5);
  const auto bf = f.at("c.bf16").to_vector<float>();
  EXPECT_EQ(bf[0], 1.0f);
  EXPECT_EQ(bf[1], -2.5f);
  EXPECT_NEAR(bf[2], 0.1f, 0.1f / 128);
  EXPECT_THROW(f.at("d.i64").to_vector<double>(), Error);
  EXPECT_THROW(f.at("missing"), Error);
}

TEST(Safetensors, BF16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x3F808000u)), 0x3F80);  // tie, even stays
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x3F818000u)), 0x3F82);  // tie, odd rounds up
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x3F808001u)), 0x3F81);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
}

// read_safetensors reads a file's header, then each tensor from its offset: it must judge
// every file as parse_safetensors judges the same bytes in memory.
std::string write_bytes(const std::vector<uint8_t>& bytes) {
  const auto path = scratch_path("bytes");
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  return path;
}

TEST(Safetensors, EveryTruncationIsRejected) {
  const auto bytes = serialize_safetensors(sample_file());
  for (size_t length = 0; length < bytes.size(); ++length) {
    const std::vector<uint8_t> prefix(bytes.begin(), bytes.begin() + static_cast<ptrdiff_t>(length));
    EXPECT_THROW(parse_safetensors(prefix, "truncated"), Error) << "length " << length;
    const std::string path = write_bytes(prefix);
    EXPECT_THROW(read_safetensors(path), Error) << "file of length " << length;
    EXPECT_THROW(read_safetensors_metadata(path), Error) << "file of length " << length;
    std::filesystem::remove(path);
  }
}

TEST(Safetensors, MutatedFilesNeverCrash) {
  const auto original = serialize_safetensors(sample_file());
  std::mt19937 gen(2024);
  int rejected = 0;
  for (int trial = 0; trial < 400; ++trial) {
    auto bytes = original;
    const int flips = 1 + trial % 4;
    for (int k = 0; k < flips; ++k) {
      // Mostly the length and header, where the structure lives.
      const size_t limit = trial % 3 == 0 ? bytes.size() : std::min<size_t>(bytes.size(), 200);
      bytes[gen() % limit] = static_cast<uint8_t>(gen());
    }
    std::vector<uint8_t> in_memory, from_file;
    try {
      const Safetensors f = parse_safetensors(bytes, "mutated");
      for (const auto& [name, t] : f.tensors)
        EXPECT_EQ(t.bytes.size(), static_cast<size_t>(t.numel()) * dtype_size(t.dtype)) << name;
      in_memory = serialize_safetensors(f);
    } catch (const Error&) {
      ++rejected;
    }
    const std::string path = write_bytes(bytes);
    try {
      from_file = serialize_safetensors(read_safetensors(path));
    } catch (const Error&) {
    }
    std::filesystem::remove(path);
    EXPECT_EQ(from_file, in_memory) << "trial " << trial;  // both rejected (empty) or the same tensors
  }
  EXPECT_GT(rejected, 100);  // most mutations of the header must be caught
}

TEST(Safetensors, MalformedHeadersAreNamed) {
  auto make = [](const std::string& header, size_t data_bytes) {
    std::vector<uint8_t> b(8 + header.size() + data_bytes, 0);
    for (int i = 0; i < 8; ++i) b[i] = static_cast<uint8_t>(header.size() >> (8 * i));
    std::copy(header.begin(), header.end(), b.begin() + 8);
    return b;
  };
  auto message = [&](const std::string& header, size_t data_bytes) -> std::string {
    try {
      parse_safetensors(make(header, data_bytes), "bad.safetensors");
    } catch (const Error& e) {
      return e.what();
    }
    return "accepted";
  };
  EXPECT_EQ(message(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8), "accepted");
  EXPECT_NE(message(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8).find("needs 12"), std::string::npos);
  EXPECT_NE(message(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", 8).find("truncated"),
            std::string::npos);
  EXPECT_NE(message(R"({"t":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})", 8).find("unsupported dtype"),
            std::string::npos);
  EXPECT_NE(message(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8).find("shape"), std::string::npos);
  EXPECT_NE(message(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8)
                .find("overflow"),
            std::string::npos);
  EXPECT_NE(message(R"({"t":)", 0).find("not valid JSON"), std::string::npos);
  EXPECT_NE(message(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                    R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                    12)
                .find("overlap"),
            std::string::npos);
  EXPECT_NE(message(R"([1,2])", 0).find("bad.safetensors"), std::string::npos);
}

TEST(Safetensors, MissingFileIsAnError) {
  EXPECT_THROW(read_safetensors("/nonexistent/dir/file.safetensors"), Error);
}

// A directory opens as a stream on Linux, and reading it threw std::ios_base::failure past
// every caller (`mhc parity DIR` ended in std::terminate).
TEST(Safetensors, DirectoryIsANamedError) {
  const std::string dir = std::filesystem::temp_directory_path().string();
  try {
    read_safetensors(dir);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(dir + ": is a directory"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace mhc
