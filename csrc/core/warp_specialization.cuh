// The two primitives of warp-specialized kernels, where warpgroups of one CTA
// play different roles (a producer streaming tiles, consumers computing):
//
//   named_barrier_sync(id, n)    arrive at barrier `id` and wait until n threads have arrived
//   named_barrier_arrive(id, n)  arrive without waiting (a producer signalling its consumers,
//                                or consumers freeing a buffer)
//   set_max_registers<N, kInc>() setmaxnreg (sm_90a): this warpgroup's registers per thread
//                                become N; a producer gives registers back (.dec), its
//                                consumers take them (.inc)
//
// Named barriers.
// Barrier 0 is __syncthreads'; ids 1..15 are free for these. n is a multiple
// of the warp size and whole warps call them together (the PTX instructions
// are .aligned). When a phase completes, the memory accesses each arriving
// thread made before its arrival are performed relative to every
// participating thread (PTX ISA, barrier): an arrive -> sync pair publishes
// the arriver's shared-memory writes (for cp.async: after its wait_group).
//
// setmaxnreg. The register file is split among an SM's four schedulers and a
// CTA's warps are dealt to them in turn, so a 288- or 384-thread CTA gets at
// most 168 registers a thread (3 warps per scheduler) from the launch bounds,
// whatever its roles need. A producer warpgroup that needs few registers lowers
// its own count and the consumer warpgroups raise theirs out of the freed pool:
// producer + 2 consumers <= 3 x 168 per thread slot. Every thread of the
// warpgroup executes it (.sync.aligned); .inc waits until the registers are free.
// The emulator keeps the pool: an .inc nobody gives registers for deadlocks there too.
//
// Under QWEN3X_EMULATOR (tests/emulator) each calls the emulation.
#pragma once

#include <cuda_runtime.h>

#include "core/wgmma.cuh"  // QWEN3X_WGMMA_ENABLED: sm_90a code

namespace qwen3x {

__device__ __forceinline__ void named_barrier_sync(int id, int num_threads) {
#if defined(QWEN3X_EMULATOR)
  emu::named_barrier(id, num_threads, /*wait=*/true);
#else
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(num_threads) : "memory");
#endif
}

__device__ __forceinline__ void named_barrier_arrive(int id, int num_threads) {
#if defined(QWEN3X_EMULATOR)
  emu::named_barrier(id, num_threads, /*wait=*/false);
#else
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(num_threads) : "memory");
#endif
}

template <int kRegs, bool kInc>
__device__ __forceinline__ void set_max_registers() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: 24..256, multiple of 8");
#if defined(QWEN3X_EMULATOR)
  emu::setmaxnreg(kRegs, kInc);
#elif defined(QWEN3X_WGMMA_ENABLED)
  if constexpr (kInc) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
  } else {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
  }
#endif
}

}  // namespace qwen3x
