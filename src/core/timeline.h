// A device timeline: what ran on which stream and when (core/cuda/cupti_timeline.h records
// one), its summary (how busy each stream was, how long two ran at once, how long the
// device idled, which kernels took the time and how much of it alone) and its Chrome trace
// events (chrome://tracing or ui.perfetto.dev). CPU code: the summary is tested without a
// GPU.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace mhc {

struct TimelineRecord {
  std::string name;  // the kernel's short name (timeline_kernel_name), or "memset" / "memcpy"
  uint32_t stream = 0;
  uint64_t start_ns = 0, end_ns = 0;
};

struct StreamBusy {
  uint32_t stream = 0;
  double busy_ms = 0;  // time with at least one of its records running
  int64_t records = 0;
};

struct NameTotal {
  std::string name;
  double total_ms = 0;  // summed durations
  double alone_ms = 0;  // of which nothing else ran
  int64_t calls = 0;
};

struct TimelineSummary {
  double span_ms = 0;               // first start to last end
  double idle_ms = 0;               // nothing running
  double overlap_ms = 0;            // records of two or more streams running
  std::vector<StreamBusy> streams;  // the busiest first
  std::vector<NameTotal> names;     // the largest total first
};

TimelineSummary summarize_timeline(const std::vector<TimelineRecord>& records);

// A demangled kernel signature without its return type, namespaces and parameter list,
// e.g. "void mhc::cuda::(anonymous namespace)::foo_kernel<4, true>(float const*, long)" ->
// "foo_kernel<4, true>"; a name that is not mangled (C kernels) is kept as it is.
std::string timeline_kernel_name(const char* mangled);

// Chrome trace events ("X" events in microseconds from the first start, one thread a
// stream, process `pid` named `process`), to be put in a {"traceEvents": [...]} object.
nlohmann::json timeline_trace_events(const std::vector<TimelineRecord>& records, int pid, const std::string& process);

}  // namespace mhc
