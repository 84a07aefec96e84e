// Host-side launch helpers whose answers never change for a device, cached so that a decode step
// (hundreds of launches) does not pay a runtime call for each: the SM count, and the opt-in to more
// than 48 KB of dynamic shared memory, which a kernel needs once per device.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace qwen3x {

// Devices a process can see at most for the caches below (beyond it: no caching, still correct).
constexpr int kMaxCachedDevices = 64;

// A per-device value that never changes, from query(device) (0 = failed: not cached), cached in
// `cache` (one array per value).
template <typename Query>
int cached_per_device(std::atomic<int> (&cache)[kMaxCachedDevices], int device, Query query) {
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  const int value = query(device);
  if (cacheable && value > 0) cache[device].store(value, std::memory_order_relaxed);
  return value;
}

// Streaming multiprocessors of `device`; 0 if the query failed (callers then use one wave).
inline int sm_count(int device) {
  static std::atomic<int> cache[kMaxCachedDevices] = {};
  return cached_per_device(cache, device, [](int d) {
    int count = 0;
    return cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, d) == cudaSuccess ? count : 0;
  });
}

// Compute capability of `device` as major * 10 + minor (90 for H100 / H200); 0 if the query failed.
inline int compute_capability(int device) {
  static std::atomic<int> cache[kMaxCachedDevices] = {};
  return cached_per_device(cache, device, [](int d) {
    int major = 0;
    int minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d) != cudaSuccess) {
      cudaGetLastError();  // a failed query: the caller falls back, nothing else to report
      return 0;
    }
    return major * 10 + minor;
  });
}

// Lets `Kernel` use `bytes` of dynamic shared memory on the current device; the runtime call is
// made once per (kernel, device). One instantiation per kernel pointer, so each kernel has its own
// record.
template <auto Kernel>
cudaError_t allow_dynamic_smem(int bytes) {
  static std::atomic<uint64_t> done{0};  // bit d: configured on device d
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device < kMaxCachedDevices ? (uint64_t{1} << device) : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit)) return cudaSuccess;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && bit != 0) done.fetch_or(bit, std::memory_order_release);
  return err;
}

// CTAs of `Kernel` (threads per CTA, dynamic shared memory bytes) resident on one SM of the
// current device, asked once per device after the shared-memory opt-in; `fallback` if a query
// fails. (80 KB of shared memory fits twice on sm_80/sm_90, once on sm_86/sm_89.)
template <auto Kernel>
int resident_ctas_per_sm(int threads, int smem_bytes, int fallback) {
  static std::atomic<int> cache[kMaxCachedDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return fallback;
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int ctas = 0;
  if (allow_dynamic_smem<Kernel>(smem_bytes) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, Kernel, threads, smem_bytes) != cudaSuccess ||
      ctas <= 0) {
    cudaGetLastError();  // clear a failed query's error; the launch reports real problems
    return fallback;
  }
  if (cacheable) cache[device].store(ctas, std::memory_order_relaxed);
  return ctas;
}

}  // namespace qwen3x
