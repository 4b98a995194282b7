#include "core/config_fields.h"

#include "core/error.h"

namespace mhc::fields {

namespace {
std::string describe(const nlohmann::json& value) { return value.dump(); }
}  // namespace

void assign(const std::string& key, int64_t& field, const nlohmann::json& value) {
  check(value.is_number_integer() ||
            (value.is_number_float() && value.get<double>() == static_cast<double>(value.get<int64_t>())),
        key + ": expected an integer, got " + describe(value));
  field = value.get<int64_t>();
}
void assign(const std::string& key, double& field, const nlohmann::json& value) {
  check(value.is_number(), key + ": expected a number, got " + describe(value));
  field = value.get<double>();
}
void assign(const std::string& key, bool& field, const nlohmann::json& value) {
  check(value.is_boolean(), key + ": expected true or false, got " + describe(value));
  field = value.get<bool>();
}
void assign(const std::string& key, std::string& field, const nlohmann::json& value) {
  check(value.is_string(), key + ": expected a string, got " + describe(value));
  field = value.get<std::string>();
}
void assign(const std::string& key, std::optional<int64_t>& field, const nlohmann::json& value) {
  if (value.is_null()) {
    field.reset();
    return;
  }
  int64_t v = 0;
  assign(key, v, value);
  field = v;
}

std::pair<std::string, nlohmann::json> parse_assignment(const std::string& assignment) {
  const auto eq = assignment.find('=');
  check(eq != std::string::npos && eq > 0, "override '" + assignment + "' is not of the form key=value");
  const std::string key = assignment.substr(0, eq), text = assignment.substr(eq + 1);
  nlohmann::json value = nlohmann::json::parse(text, nullptr, false);
  if (value.is_discarded()) value = text;  // bare words are strings
  return {key, value};
}

}  // namespace mhc::fields
