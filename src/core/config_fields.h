// The field machinery shared by configuration structs: each struct lists its fields once
// in a `visit_fields(config, visit)` function, and these helpers read them from JSON,
// write them to JSON and set one from `key=value`, with errors that name the field.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <type_traits>

namespace mhc::fields {

void assign(const std::string& key, int64_t& field, const nlohmann::json& value);
void assign(const std::string& key, double& field, const nlohmann::json& value);
void assign(const std::string& key, bool& field, const nlohmann::json& value);
void assign(const std::string& key, std::string& field, const nlohmann::json& value);
void assign(const std::string& key, std::optional<int64_t>& field, const nlohmann::json& value);

// The value of "key=value": JSON when it parses, else the text as a string (connection=hc).
std::pair<std::string, nlohmann::json> parse_assignment(const std::string& assignment);

// Sets the field named `key`; false when the struct has none.
template <typename Config, typename VisitFields>
bool set(Config& config, VisitFields&& visit_fields, const std::string& key, const nlohmann::json& value) {
  bool found = false;
  visit_fields(config, [&](const char* name, auto& field) {
    if (key == name) {
      assign(key, field, value);
      found = true;
    }
  });
  return found;
}

template <typename Config, typename VisitFields>
void to_json(const Config& config, VisitFields&& visit_fields, nlohmann::json& json) {
  visit_fields(config, [&](const char* name, const auto& field) {
    using Field = std::decay_t<decltype(field)>;
    if constexpr (std::is_same_v<Field, std::optional<int64_t>>)
      json[name] = field ? nlohmann::json(*field) : nlohmann::json(nullptr);
    else
      json[name] = field;
  });
}

}  // namespace mhc::fields
