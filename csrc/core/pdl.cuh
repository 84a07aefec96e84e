// Programmatic dependent launch (PDL, sm_90): a kernel launched with it may
// start while the kernel before it in the stream is still running, so that its
// launch and CTA setup overlap the other's tail instead of following it. A
// decode step is a chain of small kernels (MoE: router, GEMM1, GEMM2;
// attention: qk_norm_rope, forward, split-KV combine) where those gaps are a
// large part of the time; inside a CUDA graph the edges become programmatic
// ones.
//
// The contract that keeps it correct: every kernel launched with PDL
// (launch_kernel(pdl = true, ...)) calls pdl_wait() as its first statement,
// before any global memory access, so nothing reads an input the previous
// kernel is still writing, nor writes a buffer it still reads. griddepcontrol.wait
// returns once every prerequisite grid has completed and its memory is
// visible; in a kernel launched without PDL it returns at once. After its
// wait a kernel calls pdl_launch_dependents(): once every CTA of it has done so
// (or exited), the next PDL kernel may be scheduled, and its CTAs wait in
// their own pdl_wait() for this grid to finish. By induction each kernel of a
// chain starts its real work after all earlier ones finished, and when a kernel
// starts, every kernel before the previous one has finished. One kernel uses
// that: the expert GEMM2 (moe/grouped_gemm.cuh) reads inputs that were final
// before GEMM1 began, through L2, and prefetches its weights before its wait;
// it writes nothing before it.
//
// Where: pdl_enabled(device) (host) -- an sm_90 device and a build with sm_90a
// code, whose cubin (the one an sm_90 device runs) has the two instructions
// (SASS ACQBULK and PREEXIT; cmake/sass_check.py requires them in the kernels
// that launch_kernel may launch with PDL). Elsewhere (sm_80 code, the
// emulator) both are no-ops and launches are plain. QWEN3X_PDL=0 turns it off:
// an A/B switch for the benchmarks.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <string_view>
#include <utility>

#include "core/launch.h"

namespace qwen3x {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(QWEN3X_EMULATOR)
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(QWEN3X_EMULATOR)
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether kernels on `device` are launched with PDL: an sm_90 device running this build's sm_90a
// code, unless QWEN3X_PDL=0.
inline bool pdl_enabled(int device) {
#if defined(QWEN3X_HAS_SM90A) && !defined(QWEN3X_EMULATOR)
  constexpr int kHopper = 90;
  const char* env = std::getenv("QWEN3X_PDL");
  if (env != nullptr && std::string_view(env) == "0") return false;
  return compute_capability(device) == kHopper;
#else
  (void)device;
  return false;
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), with the programmatic stream serialization
// attribute when `pdl` (the kernel must start with pdl_wait()). Returns the launch's error when
// the attribute was asked for; callers check cudaGetLastError() as after any launch.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel(bool pdl, void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                          size_t smem, cudaStream_t stream, Args&&... args) {
#if !defined(QWEN3X_EMULATOR)
  if (pdl) {
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attribute;
    config.numAttrs = 1;
    return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  }
#endif
  (void)pdl;
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaSuccess;
}

}  // namespace qwen3x
