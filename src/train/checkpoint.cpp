#include "train/checkpoint.h"

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/safetensors.h"

namespace mhc {

namespace {

constexpr const char* kFormat = "mhc-checkpoint-1";

int64_t metadata_int(const Safetensors& file, const std::string& key, const std::string& path) {
  auto it = file.metadata.find(key);
  check(it != file.metadata.end(), path + ": not an mhc checkpoint (metadata has no '" + key + "')");
  try {
    return std::stoll(it->second);
  } catch (const std::exception&) {
    fail(path + ": metadata '" + key + "' is not an integer");
  }
}

void load_into(const Safetensors& file, const std::string& name, const std::vector<int64_t>& shape,
               std::vector<float>& out, const std::string& path) {
  check(file.has(name), path + ": checkpoint has no tensor '" + name + "'");
  const HostTensor& t = file.at(name);
  HostTensor expected;
  expected.shape = shape;
  check(t.shape == shape, path + ": tensor '" + name + "' has shape " + t.shape_string() +
                              " but the configuration needs " + expected.shape_string());
  out = t.to_vector<float>();
}

}  // namespace

void save_checkpoint(const std::string& path, const TrainConfig& config, Gpt<float>& model, const AdamW* optimizer,
                     const TrainingState& state) {
  Safetensors file;
  file.metadata["format"] = kFormat;
  file.metadata["step"] = std::to_string(state.step);
  file.metadata["data_position"] = std::to_string(state.data_position);
  file.metadata["config"] = train_config_to_json(config).dump();
  const auto parameters = model.parameters();
  for (size_t k = 0; k < parameters.size(); ++k) {
    const Parameter<float>& p = *parameters[k];
    file.tensors[p.name] = HostTensor::from_values<float>(DType::F32, p.shape, p.value);
    if (optimizer) {
      file.tensors["optimizer.exp_avg." + p.name] =
          HostTensor::from_values<float>(DType::F32, p.shape, optimizer->exp_avg[k]);
      file.tensors["optimizer.exp_avg_sq." + p.name] =
          HostTensor::from_values<float>(DType::F32, p.shape, optimizer->exp_avg_sq[k]);
    }
  }
  if (optimizer) file.metadata["optimizer_steps"] = std::to_string(optimizer->steps_taken);
  write_safetensors(path, file);
}

TrainConfig checkpoint_config(const std::string& path) {
  const Safetensors file = read_safetensors(path);
  auto it = file.metadata.find("format");
  check(it != file.metadata.end() && it->second == kFormat, path + ": not an mhc checkpoint");
  const auto config = nlohmann::json::parse(file.metadata.at("config"), nullptr, false);
  check(!config.is_discarded(), path + ": the stored configuration is not valid JSON");
  TrainConfig c = train_config_from_json(config);
  c.validate();
  return c;
}

TrainingState load_checkpoint(const std::string& path, Gpt<float>& model, AdamW* optimizer) {
  const Safetensors file = read_safetensors(path);
  auto it = file.metadata.find("format");
  check(it != file.metadata.end() && it->second == kFormat, path + ": not an mhc checkpoint");
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
