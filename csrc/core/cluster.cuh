// Thread block clusters (sm_90): the CTAs of one cluster are resident at once, on one GPC, and
// may read each other's shared memory (distributed shared memory, DSMEM) once a cluster-wide
// barrier orders the writes before the reads. Split-KV attention merges its splits this way
// (attention/combine.cuh, combine_in_cluster) instead of through L2.
//
// Device: the cluster barrier (arrive.release + wait.acquire: every thread of every CTA of the
// cluster, like __syncthreads across CTAs, and it orders shared-memory writes before the barrier
// with reads of them after it; or relaxed, ordering nothing), and loads of another CTA's shared
// memory (mapa turns this CTA's shared address into the same offset in the CTA of a given rank).
// Only sm_90 code has them; sm_80 code traps (the host never launches a cluster there). Under
// QWEN3X_EMULATOR each calls its emulation (tests/emulator: a cluster's CTAs run side by side).
//
// Host: launch_kernel_cluster (cudaLaunchKernelEx with the cluster shape, and programmatic
// dependent launch when asked, core/pdl.cuh) and resident_clusters, which asks the occupancy API
// once per (kernel, device, cluster size) how many such clusters can be resident at once.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>

#include "core/launch.h"

namespace qwen3x {

constexpr int kMaxPortableClusterSize = 8;  // any sm_90 part
constexpr int kMaxClusterSize = 16;         // H100 / H200, with the non-portable opt-in

// ---- device ------------------------------------------------------------------------------------

// Every thread of every CTA of the cluster, in convergent code (.aligned); shared-memory writes
// before it are visible to the cluster's DSMEM reads after it.
__device__ __forceinline__ void cluster_sync() {
#if defined(QWEN3X_EMULATOR)
  emu::cluster_arrive(/*release=*/true);
  emu::cluster_wait();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n\t"
      "barrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
  __trap();
#endif
}

// The same meeting without ordering memory (arrive.relaxed: no MEMBAR before it, where release
// waits for this thread's outstanding global stores): for keeping the cluster's CTAs resident
// until the others are done reading them, once those reads have returned.
__device__ __forceinline__ void cluster_sync_relaxed() {
#if defined(QWEN3X_EMULATOR)
  emu::cluster_arrive(/*release=*/false);
  emu::cluster_wait();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "barrier.cluster.arrive.relaxed.aligned;\n\t"
      "barrier.cluster.wait.aligned;" ::: "memory");
#else
  __trap();
#endif
}

// The shared::cluster address of `smem_addr` (a shared::cta address of this CTA) in the CTA of
// cluster rank `rank`: the same offset in that CTA's shared memory.
__device__ __forceinline__ uint32_t map_shared_rank(uint32_t smem_addr, int rank) {
#if defined(QWEN3X_EMULATOR)
  return emu::map_shared_rank(smem_addr, rank);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t addr;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(addr) : "r"(smem_addr), "r"(rank));
  return addr;
#else
  __trap();
  return 0;
#endif
}

__device__ __forceinline__ float ld_shared_cluster(uint32_t cluster_addr) {
#if defined(QWEN3X_EMULATOR)
  return emu::ld_shared_cluster<float>(cluster_addr);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(cluster_addr) : "memory");
  return v;
#else
  __trap();
  return 0.0f;
#endif
}

__device__ __forceinline__ float4 ld_shared_cluster_v4(uint32_t cluster_addr) {  // 16-byte aligned
#if defined(QWEN3X_EMULATOR)
  return emu::ld_shared_cluster<float4>(cluster_addr);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(cluster_addr)
               : "memory");
  return v;
#else
  __trap();
  return make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#endif
}

// ---- host --------------------------------------------------------------------------------------

// kernel<<<grid, block, smem, stream>>>(args...) in clusters of `cluster` CTAs (grid a multiple
// of it), with programmatic dependent launch when `pdl` (core/pdl.cuh's contract). Clusters
// above kMaxPortableClusterSize need cluster_fits' opt-in first.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel_cluster(bool pdl, dim3 cluster, void (*kernel)(KernelArgs...), dim3 grid,
                                  dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attribute[2];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = cluster.x;
  attribute[0].val.clusterDim.y = cluster.y;
  attribute[0].val.clusterDim.z = cluster.z;
  attribute[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[1].val.programmaticStreamSerializationAllowed = 1;
  // (positional: gridDim, blockDim, dynamicSmemBytes, stream, attrs, numAttrs; the emulator
  // defines gridDim and blockDim as macros)
  cudaLaunchConfig_t config = {grid, block, smem, stream, attribute, pdl ? 2u : 1u};
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// How many clusters of `size` CTAs of Kernel (threads and dynamic shared memory per CTA; the
// shared-memory opt-in already made) can be resident at once on the current device, 0 if none (a
// cluster's CTAs share one GPC, so this is at most, and can be well under, SMs x CTAs per SM /
// size): sizes 2 to kMaxClusterSize, the larger ones after the non-portable opt-in. A definite
// answer is cached per (device, size); a failed query says 0 and is asked again next time. Clears
// only the errors of its own calls (an error pending from before stays for its owner's check).
template <auto Kernel>
int resident_clusters(int size, int threads, int smem_bytes) {
  if (size < 2 || size > kMaxClusterSize) return 0;
  // per device and size: 0 unknown, else the count + 1
  static std::atomic<int> cache[kMaxCachedDevices][kMaxClusterSize + 1] = {};
  const bool clean = cudaPeekAtLastError() == cudaSuccess;
  const auto failed = [&] {
    if (clean) cudaGetLastError();
    return 0;
  };
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return failed();
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    const int known = cache[device][size].load(std::memory_order_relaxed);
    if (known != 0) return known - 1;
  }
  if (size > kMaxPortableClusterSize &&
      cudaFuncSetAttribute(Kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
    return failed();
  }
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = 1;
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = static_cast<unsigned>(size);
  // (positional, as in launch_kernel_cluster)
  cudaLaunchConfig_t config = {dim3(1, 1, size), dim3(threads), static_cast<size_t>(smem_bytes), nullptr,
                               attribute, 1u};
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, Kernel, &config) != cudaSuccess) return failed();
  clusters = std::max(clusters, 0);
  if (cacheable) cache[device][size].store(clusters + 1, std::memory_order_relaxed);
  return clusters;
}

}  // namespace qwen3x
