#include "train/checkpoint.h"

#include <bit>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/safetensors.h"

namespace mhc {

namespace {

constexpr const char* kFormat = "mhc-checkpoint-1";

int64_t metadata_int(const SafetensorsReader& file, const std::string& key, const std::string& path) {
  auto it = file.metadata().find(key);
  check(it != file.metadata().end(), path + ": not an mhc checkpoint (metadata has no '" + key + "')");
  try {
    return std::stoll(it->second);
  } catch (const std::exception&) {
    fail(path + ": metadata '" + key + "' is not an integer");
  }
}

// The tensor's values into `out`: F32 (what save_checkpoint writes) read straight into it,
// another dtype through its bytes, converted.
void load_into(const SafetensorsReader& file, const std::string& name, const std::vector<int64_t>& shape,
               std::vector<float>& out, const std::string& path) {
  check(file.has(name), path + ": checkpoint has no tensor '" + name + "'");
  const HostTensor& info = file.tensor(name);
  HostTensor expected;
  expected.shape = shape;
  check(info.shape == shape, path + ": tensor '" + name + "' has shape " + info.shape_string() +
                                 " but the configuration needs " + expected.shape_string());
  if (info.dtype == DType::F32) {
    out.resize(static_cast<size_t>(shape_numel(shape)));
    file.read(name, {reinterpret_cast<uint8_t*>(out.data()), out.size() * sizeof(float)});
    return;
  }
  out = file.read(name).to_vector<float>();
}

}  // namespace

void save_checkpoint(const std::string& path, const TrainConfig& config, Gpt<float>& model, const AdamW* optimizer,
                     const TrainingState& state) {
  std::map<std::string, std::string> metadata{{"format", kFormat},
                                              {"step", std::to_string(state.step)},
                                              {"data_position", std::to_string(state.data_position)},
                                              {"config", train_config_to_json(config).dump()}};
  // The values and moments are written from where they lie (F32, little-endian as in memory).
  static_assert(std::endian::native == std::endian::little, "F32 tensors are written as they lie in memory");
  auto view = [](const Parameter<float>& p, const std::vector<float>& values) {
    return TensorView{
        DType::F32, p.shape, {reinterpret_cast<const uint8_t*>(values.data()), values.size() * sizeof(float)}};
  };
  TensorViews tensors;
  const auto parameters = model.parameters();
  for (size_t k = 0; k < parameters.size(); ++k) {
    const Parameter<float>& p = *parameters[k];
    tensors[p.name] = view(p, p.value);
    if (optimizer) {
      tensors["optimizer.exp_avg." + p.name] = view(p, optimizer->exp_avg[k]);
      tensors["optimizer.exp_avg_sq." + p.name] = view(p, optimizer->exp_avg_sq[k]);
    }
  }
  if (optimizer) metadata["optimizer_steps"] = std::to_string(optimizer->steps_taken);
  write_safetensors(path, tensors, metadata);
}

TrainConfig checkpoint_config(const std::string& path) {
  const std::map<std::string, std::string> metadata = read_safetensors_metadata(path);
  auto it = metadata.find("format");
  check(it != metadata.end() && it->second == kFormat, path + ": not an mhc checkpoint");
  it = metadata.find("config");
  check(it != metadata.end(), path + ": not an mhc checkpoint (metadata has no 'config')");
  const auto config = nlohmann::json::parse(it->second, nullptr, false);
  check(!config.is_discarded(), path + ": the stored configuration is not valid JSON");
  TrainConfig c = train_config_from_json(config);
  c.validate();
  return c;
}

TrainingState load_checkpoint(const std::string& path, Gpt<float>& model, AdamW* optimizer) {
  // F32 values as they lie in memory (save_checkpoint's static_assert)
  const SafetensorsReader file(path);
  auto it = file.metadata().find("format");
  check(it != file.metadata().end() && it->second == kFormat, path + ": not an mhc checkpoint");
  TrainingState state;
  state.step = metadata_int(file, "step", path);
  state.data_position = static_cast<uint64_t>(metadata_int(file, "data_position", path));
  const auto parameters = model.parameters();
  for (size_t k = 0; k < parameters.size(); ++k) {
    Parameter<float>& p = *parameters[k];
    load_into(file, p.name, p.shape, p.value, path);
    if (optimizer) {
      load_into(file, "optimizer.exp_avg." + p.name, p.shape, optimizer->exp_avg[k], path);
      load_into(file, "optimizer.exp_avg_sq." + p.name, p.shape, optimizer->exp_avg_sq[k], path);
    }
  }
  if (optimizer) optimizer->steps_taken = metadata_int(file, "optimizer_steps", path);
  return state;
}

}  // namespace mhc
