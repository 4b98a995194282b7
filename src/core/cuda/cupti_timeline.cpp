#include "core/cuda/cupti_timeline.h"

#include <cuda_runtime.h>
#include <cupti.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>

#include "core/cuda/device.h"
#include "core/error.h"

namespace mhc::cuda {
namespace {

void check_cupti(CUptiResult status, const char* call) {
  if (status == CUPTI_SUCCESS) return;
  const char* text = nullptr;
  cuptiGetResultString(status, &text);
  fail(std::string("timeline: ") + call + " failed: " + (text ? text : "unknown CUPTI error"));
}

constexpr CUpti_ActivityKind kKinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMSET,
                                         CUPTI_ACTIVITY_KIND_MEMCPY};
constexpr size_t kBufferBytes = size_t{8} << 20, kRecordAlignment = 8;

// Filled by CUPTI's completion callback (its own thread), read by stop_timeline.
std::mutex collected_mutex;
std::vector<TimelineRecord> collected;
bool timeline_running = false;

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(kRecordAlignment, kBufferBytes));
  *size = *buffer ? kBufferBytes : 0;
  *max_records = 0;  // as many as fit
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid_bytes) {
  std::vector<TimelineRecord> records;
  CUpti_Activity* record = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid_bytes, &record) == CUPTI_SUCCESS) {
    TimelineRecord r;
    if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || record->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
      const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
      r = {timeline_kernel_name(k->name), k->streamId, k->start, k->end};
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(record);
      r = {"memset", m->streamId, m->start, m->end};
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(record);
      r = {"memcpy", m->streamId, m->start, m->end};
    }
    if (r.start_ns > 0 && r.end_ns >= r.start_ns) records.push_back(std::move(r));  // without times: left out
  }
  std::free(buffer);
  const std::lock_guard<std::mutex> lock(collected_mutex);
  collected.insert(collected.end(), records.begin(), records.end());
}

}  // namespace

void start_timeline() {
  check(!timeline_running, "timeline: already recording");
  {
    const std::lock_guard<std::mutex> lock(collected_mutex);
    collected.clear();
  }
  check_cupti(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed), "cuptiActivityRegisterCallbacks");
  for (const CUpti_ActivityKind kind : kKinds) check_cupti(cuptiActivityEnable(kind), "cuptiActivityEnable");
  timeline_running = true;
}

uint64_t timeline_now_ns() {
  uint64_t now = 0;
  check_cupti(cuptiGetTimestamp(&now), "cuptiGetTimestamp");
  return now;
}

std::vector<TimelineRecord> stop_timeline() {
  check(timeline_running, "timeline: not recording");
  timeline_running = false;
  MHC_CUDA_CHECK(cudaDeviceSynchronize());
  for (const CUpti_ActivityKind kind : kKinds) check_cupti(cuptiActivityDisable(kind), "cuptiActivityDisable");
  check_cupti(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED), "cuptiActivityFlushAll");
  size_t dropped = 0;
  check_cupti(cuptiActivityGetNumDroppedRecords(nullptr, 0, &dropped), "cuptiActivityGetNumDroppedRecords");
  check(dropped == 0, "timeline: CUPTI dropped " + std::to_string(dropped) + " records");
  std::vector<TimelineRecord> records;
  {
    const std::lock_guard<std::mutex> lock(collected_mutex);
    records.swap(collected);
  }
  std::sort(records.begin(), records.end(),
            [](const TimelineRecord& a, const TimelineRecord& b) { return a.start_ns < b.start_ns; });
  return records;
}

}  // namespace mhc::cuda
