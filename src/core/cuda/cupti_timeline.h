// Device timelines through CUPTI's activity API: every kernel, memset and memcpy the device
// runs between start_timeline() and stop_timeline(), those inside CUDA graphs too, with its
// stream and its start and end on the device's clock (core/timeline.h summarises them).
// One timeline at a time in a process. The records are collected beside the run, not by
// replaying kernels as Nsight Compute does: GPT-2 training steps ran within 1% of their
// untraced time with every kernel recorded (H200).
#pragma once
#include <cstdint>
#include <vector>

#include "core/timeline.h"

namespace mhc::cuda {

void start_timeline();
// Now, on the clock of the records' timestamps.
uint64_t timeline_now_ns();
// Waits for the device, then returns the records since start_timeline, by start time.
// Throws if CUPTI dropped any (its buffers are allocated as it asks for them).
std::vector<TimelineRecord> stop_timeline();

}  // namespace mhc::cuda
