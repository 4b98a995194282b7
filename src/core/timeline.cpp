#include "core/timeline.h"

#include <cxxabi.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <tuple>

namespace mhc {

TimelineSummary summarize_timeline(const std::vector<TimelineRecord>& records) {
  TimelineSummary s;
  if (records.empty()) return s;
  // A sweep over the records' ends and starts (ends first at equal times: back-to-back
  // records do not overlap), counting the running records of each stream, and of all
  // (with the sum of their indices: where one runs, which one).
  struct Event {
    uint64_t t;
    int delta;
    uint32_t stream;
    size_t record;
  };
  std::vector<Event> events;
  std::map<uint32_t, StreamBusy> streams;
  std::map<std::string, NameTotal> names;
  for (size_t k = 0; k < records.size(); ++k) {
    const TimelineRecord& r = records[k];
    events.push_back({r.start_ns, +1, r.stream, k});
    events.push_back({r.end_ns, -1, r.stream, k});
    streams[r.stream].stream = r.stream;
    ++streams[r.stream].records;
    NameTotal& n = names[r.name];
    n.name = r.name;
    n.total_ms += static_cast<double>(r.end_ns - r.start_ns) / 1e6;
    ++n.calls;
  }
  std::sort(events.begin(), events.end(),
            [](const Event& a, const Event& b) { return std::tie(a.t, a.delta) < std::tie(b.t, b.delta); });
  std::map<uint32_t, int> running;
  int streams_running = 0, records_running = 0;
  size_t running_sum = 0;
  uint64_t busy_ns = 0, overlap_ns = 0;
  for (size_t i = 0; i < events.size(); ++i) {
    if (i > 0) {
      const uint64_t dt = events[i].t - events[i - 1].t;
      if (streams_running >= 1) busy_ns += dt;
      if (streams_running >= 2) overlap_ns += dt;
      if (records_running == 1) names[records[running_sum].name].alone_ms += static_cast<double>(dt) / 1e6;
      for (const auto& [stream, count] : running)
        if (count > 0) streams[stream].busy_ms += static_cast<double>(dt) / 1e6;
    }
    records_running += events[i].delta;
    running_sum = events[i].delta > 0 ? running_sum + events[i].record : running_sum - events[i].record;
    int& count = running[events[i].stream];
    if (count == 0 && events[i].delta > 0) ++streams_running;
    count += events[i].delta;
    if (count == 0 && events[i].delta < 0) --streams_running;
  }
  const uint64_t span_ns = events.back().t - events.front().t;
  s.span_ms = static_cast<double>(span_ns) / 1e6;
  s.idle_ms = static_cast<double>(span_ns - busy_ns) / 1e6;
  s.overlap_ms = static_cast<double>(overlap_ns) / 1e6;
  for (const auto& [stream, busy] : streams) s.streams.push_back(busy);
  std::sort(s.streams.begin(), s.streams.end(), [](const StreamBusy& a, const StreamBusy& b) {
    return a.busy_ms != b.busy_ms ? a.busy_ms > b.busy_ms : a.stream < b.stream;
  });
  for (const auto& [name, total] : names) s.names.push_back(total);
  std::sort(s.names.begin(), s.names.end(), [](const NameTotal& a, const NameTotal& b) {
    return a.total_ms != b.total_ms ? a.total_ms > b.total_ms : a.name < b.name;
  });
  return s;
}

std::string timeline_kernel_name(const char* mangled) {
  int status = 0;
  const std::unique_ptr<char, decltype(&std::free)> demangled(abi::__cxa_demangle(mangled, nullptr, nullptr, &status),
                                                              &std::free);
  if (status != 0 || !demangled) return mangled;
  std::string name = demangled.get();
  if (!name.empty() && name.back() == ')') {  // the parameter list: back to its opening parenthesis
    int depth = 0;
    for (size_t i = name.size(); i-- > 0;) {
      depth += name[i] == ')' ? 1 : name[i] == '(' ? -1 : 0;
      if (depth == 0) {
        name.resize(i);
        break;
      }
    }
  }
  // The return type and the namespaces: what precedes the last "::" or space outside the
  // template arguments.
  int depth = 0;
  size_t begin = 0;
  for (size_t i = 0; i < name.size(); ++i) {
    depth += name[i] == '<' ? 1 : name[i] == '>' ? -1 : 0;
    if (depth == 0 && name[i] == ' ') begin = i + 1;
    if (depth == 0 && name.compare(i, 2, "::") == 0) begin = i + 2;
  }
  return name.substr(begin);
}

nlohmann::json timeline_trace_events(const std::vector<TimelineRecord>& records, int pid, const std::string& process) {
  nlohmann::json events = nlohmann::json::array();
  events.push_back({{"name", "process_name"}, {"ph", "M"}, {"pid", pid}, {"args", {{"name", process}}}});
  if (records.empty()) return events;
  uint64_t first = records.front().start_ns;
  std::map<uint32_t, bool> streams;
  for (const TimelineRecord& r : records) first = std::min(first, r.start_ns), streams[r.stream] = true;
  for (const auto& [stream, unused] : streams)
    events.push_back({{"name", "thread_name"},
                      {"ph", "M"},
                      {"pid", pid},
                      {"tid", stream},
                      {"args", {{"name", "stream " + std::to_string(stream)}}}});
  for (const TimelineRecord& r : records)
    events.push_back({{"name", r.name},
                      {"ph", "X"},
                      {"pid", pid},
                      {"tid", r.stream},
                      {"ts", static_cast<double>(r.start_ns - first) / 1e3},
                      {"dur", static_cast<double>(r.end_ns - r.start_ns) / 1e3}});
  return events;
}

}  // namespace mhc
