// When the CPU ops' OpenMP loops fork: only past kParallelMinWork inner-loop steps. Below
// it starting the threads and their closing barrier cost more than the work, and with more
// runnable threads than cores (tests in parallel, other processes) each barrier can wait a
// scheduler time slice for a descheduled thread: the tiny GPT's whole-model gradient check
// took minutes instead of seconds that way. The loops' iterations are independent, so the
// results do not depend on it.
#pragma once
#include <cstdint>

namespace mhc::cpu {

constexpr int64_t kParallelMinWork = int64_t{1} << 15;

}  // namespace mhc::cpu
