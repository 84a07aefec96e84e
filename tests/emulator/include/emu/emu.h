// A small CUDA execution model for the CPU, so that the kernels' own source (csrc/*.cuh, with
// their host launchers) runs on a machine without a GPU: tests/emulator/README.md.
//
// Every CUDA thread is a fiber (its own stack, switched by a few instructions, no system call);
// one CTA runs at a time, its fibers scheduled round-robin and switched only where threads meet
// (__syncthreads, warp collectives, wgmma), so a run is deterministic for a given scheduling
// order (EMU_ORDER=forward | reverse, of the threads and of the CTAs: a result that changes with
// the order is a race).
// Warp collectives (shuffles, ldmatrix, mma.sync) and warpgroup ones (wgmma) are executed by the
// last thread to arrive, from the operands every participant left; each checks that all 32 (128)
// threads arrived at the same instruction. The asynchronous instructions run EMU_ASYNC=early
// (cp.async copies and wgmma at issue) or late (at the wait that the kernel's correctness
// depends on): a kernel that reads before waiting, or overwrites what another warp still reads,
// gives a wrong answer in one of the two modes. EMU_ASYNC=both writes (reads) at issue and again
// at the wait, so that a race checker sees both ends of the interval the hardware may use.
//
// Checked and reported as an error (emu::Error, then the runner exits non-zero): shared-memory
// addresses outside the CTA's dynamic allocation, misaligned cp.async / ldmatrix / 16-byte
// stores, collectives that not every lane reaches, deadlocks, asynchronous copies or wgmma still
// in flight when a thread exits, launches the hardware refuses (block size, grid limits, more
// than 48 KB of dynamic shared memory without the opt-in, more than the device allows).
// Also errors, as the PTX ISA's wgmma rules: a wgmma.mma_async with no wgmma.fence since its
// warpgroup started or last waited (wait_group), and a wgmma reading shared memory that a
// cp.async wrote (a generic-proxy write) before the writing thread's fence.proxy.async.
// Counted, not checked: the shared-memory wavefronts every ldmatrix and every warp's cp.async
// take (count_banks), against the conflict-free minimum.
// Global memory is plain host memory: the runner allocates each tensor on its own, so
// AddressSanitizer (the default build) catches reads and writes outside every tensor.
// Built with ThreadSanitizer instead (-fsanitize=thread), it is a race checker: each CUDA thread
// is a TSan fiber, and the only happens-before edges between the threads of a CTA are the ones
// CUDA's memory model gives (__syncthreads, __syncwarp; atomics are atomic but order nothing):
// shuffles, ldmatrix, mma and wgmma hand registers over unchecked and order no memory, their
// shared-memory reads are checked. So any two conflicting accesses to shared or global memory
// that no barrier orders are reported, whatever order the scheduler ran them in. CTAs are
// ordered one after another (races between CTAs are not looked for); the emulator's own
// bookkeeping is excluded from the check.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <set>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <vector>

#include <sys/mman.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define EMU_TSAN 1
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif

// ---- CUDA keywords as host C++ ----------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)

// ---- bf16 / fp16 -------------------------------------------------------------------------------
struct __nv_bfloat16 {
  uint16_t __x;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct __half {
  uint16_t __x;
};
struct __half2 {
  __half x, y;
};

namespace emu {

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = f2u(f);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7FFF + ((u >> 16) & 1);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_bits_to_f32(uint16_t b) { return u2f(static_cast<uint32_t>(b) << 16); }
inline uint16_t f32_to_f16_bits(float f) {
  uint32_t x = f2u(f);
  const uint32_t sign = (x >> 16) & 0x8000;
  x &= 0x7FFFFFFF;
  if (x > 0x7F800000) return static_cast<uint16_t>(sign | 0x7E00);  // NaN
  if (x >= 0x477FF000) return static_cast<uint16_t>(sign | 0x7C00);  // >= 65520: inf
  if (x < 0x38800000) {  // below 2^-14: subnormal (exact scaling by 2^24, then RNE)
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(u2f(x) * 16777216.0f)));
  }
  x += 0xFFF + ((x >> 13) & 1);  // RNE on the 13 dropped bits; a carry bumps the exponent
  x -= 112u << 23;               // exponent bias 127 -> 15
  return static_cast<uint16_t>(sign | (x >> 13));
}
inline float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F;
  const uint32_t man = h & 0x3FF;
  if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return u2f(sign | 0x7F800000 | (man << 13));
  return u2f(sign | ((exp + 112) << 23) | (man << 13));
}

}  // namespace emu

inline float __bfloat162float(__nv_bfloat16 x) { return emu::bf16_bits_to_f32(x.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {emu::f32_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline float __half2float(__half x) { return emu::f16_bits_to_f32(x.__x); }
inline __half __float2half_rn(float f) { return {emu::f32_to_f16_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
// A product of two 16-bit floats is exact in fp32 (at most 22 significant bits), so rounding the
// fp32 product once is the hardware's single rounding of the exact product.
inline __nv_bfloat162 __hmul2_rn(__nv_bfloat162 a, __nv_bfloat162 b) {
  return {__float2bfloat16_rn(__bfloat162float(a.x) * __bfloat162float(b.x)),
          __float2bfloat16_rn(__bfloat162float(a.y) * __bfloat162float(b.y))};
}
inline __half2 __hmul2_rn(__half2 a, __half2 b) {
  return {__float2half_rn(__half2float(a.x) * __half2float(b.x)),
          __float2half_rn(__half2float(a.y) * __half2float(b.y))};
}

// ---- device math as host functions -------------------------------------------------------------
using std::isinf;
using std::isnan;
inline float rsqrtf(float x) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(x))); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __uint_as_float(unsigned u) { return emu::u2f(u); }
inline unsigned __float_as_uint(float f) { return emu::f2u(f); }
inline long long __double2ll_rn(double x) { return std::llrint(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
template <typename A, typename B>
inline auto max(A a, B b) -> std::common_type_t<A, B> {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmax(C(a), C(b));
  return C(a) < C(b) ? C(b) : C(a);
}
template <typename A, typename B>
inline auto min(A a, B b) -> std::common_type_t<A, B> {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmin(C(a), C(b));
  return C(b) < C(a) ? C(b) : C(a);
}

// ---- runtime API types -------------------------------------------------------------------------
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
using cudaStream_t = struct CUstream_st*;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 14,
};
// cudaLaunchKernelEx's configuration: the attributes the kernels use (a cluster shape; the
// programmatic stream serialization of PDL, which launches in stream order here anyway).
enum cudaLaunchAttributeID {
  cudaLaunchAttributeClusterDimension = 4,
  cudaLaunchAttributeProgrammaticStreamSerialization = 6,
};
union cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
  int programmaticStreamSerializationAllowed;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes = 0;
  cudaStream_t stream = nullptr;
  cudaLaunchAttribute* attrs = nullptr;
  unsigned numAttrs = 0;
};
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};

namespace emu {

// The emulator's own bookkeeping (counters, queues, the scheduler) is not the kernel's memory:
// under ThreadSanitizer it is excluded from the race check.
struct Unchecked {
#if defined(EMU_TSAN)
  Unchecked() { __tsan_ignore_thread_begin(); }
  ~Unchecked() { __tsan_ignore_thread_end(); }
#else
  Unchecked() {}  // (user-provided: no unused-variable warning)
#endif
};
// Inside an Unchecked scope: the kernel's memory again (a collective's shared-memory reads).
struct Checked {
#if defined(EMU_TSAN)
  Checked() { __tsan_ignore_thread_end(); }
  ~Checked() { __tsan_ignore_thread_begin(); }
#else
  Checked() {}
#endif
};

// Happens-before edges, for ThreadSanitizer: release by every arriving thread, acquire by every
// leaving one.
inline void hb_release(const void* sync) {
#if defined(EMU_TSAN)
  __tsan_release(const_cast<void*>(sync));
#else
  (void)sync;
#endif
}
inline void hb_acquire(const void* sync) {
#if defined(EMU_TSAN)
  __tsan_acquire(const_cast<void*>(sync));
#else
  (void)sync;
#endif
}

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail(const std::string& what) { throw Error(what); }

// Shared-memory bank use of one kind of warp instruction (count_banks).
struct BankStats {
  long long requests = 0;    // warp-wide executions
  long long wavefronts = 0;  // shared-memory cycles they took
  long long ideal = 0;       // ... had no two lanes of a phase met in a bank
  long long unpaired = 0;    // per-lane cp.async issues no full warp matched (divergent loops)
};

// ---- the device this emulates ----------------------------------------------------------------
struct Device {
  int sms = 132;                            // H100 SXM
  int cc = 90;
  int default_smem = 48 * 1024;             // without the opt-in
  int max_smem_optin = 227 * 1024;          // sm_90
  int smem_per_sm = 228 * 1024;
  int threads_per_sm = 2048;
  int ctas_per_sm = 32;
  int reserved_smem_per_cta = 1024;
  int dyn_smem_offset = 1024 + 128;         // shared address of the dynamic allocation
  bool late = false;                        // EMU_ASYNC=late or both: complete at the wait
  bool early = true;                        // EMU_ASYNC=early or both: (also) at issue
  bool reverse = false;                     // EMU_ORDER=reverse
  int coschedule = 1;                       // EMU_COSCHEDULE=n: a launch without clusters runs n
                                            // CTAs side by side (cross-CTA protocols interleaved)
  cudaError_t last_error = cudaSuccess;
  std::map<const void*, int> smem_optin;    // kernel -> bytes allowed by cudaFuncSetAttribute
  std::set<const void*> nonportable_cluster;  // kernels allowed clusters of 9 to 16 CTAs
  long long launches = 0;
  std::map<std::string, long long> executed;  // instruction -> warp (warpgroup) executions
  std::map<std::string, BankStats> banks;  // shared-memory instruction -> bank use
};
inline Device& device() {
  static Device d;
  return d;
}

// ---- fibers ------------------------------------------------------------------------------------
extern "C" void emu_switch(void** save_sp, void* new_sp);
extern "C" void emu_fiber_start();
// (Weak symbols: every translation unit that includes this header defines them.)
// Saves the callee-saved registers and the SSE / x87 control words on the current stack, stores
// its pointer in *save_sp, switches to new_sp and restores what is there (System V x86-64).
asm(R"(
    .text
    .weak emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
    .weak emu_fiber_start
    .type emu_fiber_start, @function
emu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size emu_fiber_start, .-emu_fiber_start
)");

struct CpAsyncCopy {
  unsigned char* dst;
  const unsigned char* src;  // nullptr: zero fill
};

struct Cta;

struct Thread {
  void* sp = nullptr;
  void* tsan_fiber = nullptr;
  unsigned char* stack = nullptr;
  dim3 tid;
  int linear = 0;
  bool done = false;
  // cp.async: copies since the last commit, committed groups oldest first (late mode)
  std::vector<CpAsyncCopy> open_copies;
  std::deque<std::vector<CpAsyncCopy>> copy_groups;
  long long cp_issued = 0;  // this thread's cp.async count (pairs it with its warp's lanes)
  std::vector<uint32_t> unfenced;  // shared 16-byte chunks its copies wrote since its last
                                   // fence.proxy.async
  Cta* cta = nullptr;              // its CTA (the scheduler switches cta() with the thread)
  bool cluster_armed = false;      // barrier.cluster.arrive done, its wait not yet
  unsigned cluster_phase = 0;      // the cluster barrier generation it arrived at
};

struct Collective {  // one warp's or warpgroup's meeting point
  int arrived = 0;
  unsigned generation = 0;
  const char* what = nullptr;
  std::array<void*, 128> args{};
  char sync[2] = {};                          // happens-before objects, by generation parity
  std::map<std::string, long long> executed;  // instruction -> executions (the leader counts)
};

struct WgmmaOp;  // a recorded (late) wgmma

struct Cta {
  std::map<std::string, std::unique_ptr<unsigned char[]>> fixed_smem;  // `__shared__ T name[N]`
  dim3 block_idx, block_dim;
  int num_threads = 0;
  int alive = 0;
  std::vector<Thread> threads;
  unsigned char* smem_block = nullptr;  // shared address 0
  unsigned char* dyn_smem = nullptr;
  size_t dyn_smem_bytes = 0;
  int barrier_arrived = 0;
  unsigned barrier_generation = 0;
  char barrier_sync[2] = {};  // happens-before objects, by generation parity
  char end_sync = 0;          // every thread's exit -> the scheduler
  std::vector<Collective> warps, warpgroups;
  std::vector<std::vector<WgmmaOp>> wgmma_open;               // per warpgroup
  std::vector<std::deque<std::vector<WgmmaOp>>> wgmma_groups;  // per warpgroup
  // per warp: the shared addresses of its lanes' n-th cp.async, until all 32 have issued it
  std::vector<std::map<long long, std::pair<int, std::array<uint32_t, 32>>>> cp_lanes;
  // per 16-byte chunk of shared memory: the thread whose cp.async wrote it and has not fenced it
  // for the async proxy since (fence.proxy.async), or -1
  std::vector<int> generic_writer;
  std::vector<char> wgmma_fenced;  // per warpgroup: a wgmma.fence since its last wait_group
};

struct Sched {
  void* sp = nullptr;
  void* tsan_main = nullptr;
  Thread* cur = nullptr;
  Cta* cta = nullptr;
  dim3 grid;
  unsigned long long progress = 0;
  bool failed = false;
  std::string error;
  std::vector<unsigned char*> stack_pool;
  std::vector<void*> tsan_pool;
  // the running cluster (one CTA without clusters), by rank, and its barrier (barrier.cluster)
  std::vector<Cta*> cluster;
  bool real_cluster = false;  // a cluster launch (else CTAs merely co-scheduled, or one alone)
  int cluster_threads = 0;
  int cluster_arrived = 0;
  unsigned cluster_generation = 0;
  char cluster_sync[2] = {};  // happens-before objects, by generation parity
#if defined(EMU_ASAN)
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
#endif
};
inline Sched& sched() {
  static Sched s;
  return s;
}

constexpr size_t kStackBytes = 1 << 20;

// Switches stacks. Under ThreadSanitizer the scheduler's switch into a thread carries a
// happens-before edge (what the scheduler set up is visible) and a thread's switch back does not
// (threads of a CTA stay unordered but for CUDA's own synchronization).
inline void switch_to(void** save, void* to, const unsigned char* to_stack, size_t to_bytes,
                      bool dying, void* tsan_to, bool sync) {
#if defined(EMU_TSAN)
  __tsan_switch_to_fiber(tsan_to, sync ? 0 : __tsan_switch_to_fiber_no_sync);
#else
  (void)tsan_to;
  (void)sync;
#endif
#if defined(EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(dying ? nullptr : &fake, to_stack, to_bytes);
  emu_switch(save, to);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  (void)to_stack;
  (void)to_bytes;
  (void)dying;
  emu_switch(save, to);
#endif
}

// Back to the scheduler (the thread resumes here later).
inline void yield(bool dying = false) {
  Sched& s = sched();
  Thread* t = s.cur;
#if defined(EMU_ASAN)
  switch_to(&t->sp, s.sp, static_cast<const unsigned char*>(s.main_stack_bottom), s.main_stack_size,
            dying, s.tsan_main, false);
#else
  switch_to(&t->sp, s.sp, nullptr, 0, dying, s.tsan_main, false);
#endif
}

inline Thread& self() { return *sched().cur; }
inline Cta& cta() { return *sched().cta; }
inline int lane_id() { return self().linear % 32; }
inline int warp_id() { return self().linear / 32; }

// ---- barriers and collectives ------------------------------------------------------------------
inline void syncthreads() {
  Cta& c = cta();
  Sched& s = sched();
  const Unchecked bookkeeping;
  const unsigned gen = c.barrier_generation;
  hb_release(&c.barrier_sync[gen & 1]);
  ++s.progress;
  if (++c.barrier_arrived == c.alive) {
    c.barrier_arrived = 0;
    ++c.barrier_generation;
  } else {
    while (c.barrier_generation == gen) yield();
  }
  hb_acquire(&c.barrier_sync[gen & 1]);
}

// All `size` threads of a group meet; the last to arrive runs op(args) for all of them, args[i]
// being what member i passed. `what` names the instruction (members must agree).
// `orders_memory`: a barrier (__syncwarp), whose members' memory accesses before it happen
// before theirs after it. Otherwise (shuffles, ldmatrix, mma, wgmma: CUDA promises no memory
// ordering) the op runs unchecked, as the register hand-over it is, and checks its own
// shared-memory reads (emu::Checked).
template <typename Op>
inline void meet(Collective& g, int member, int size, const char* what, void* mine, Op op,
                 bool orders_memory = false) {
  Sched& s = sched();
  unsigned gen;
  bool leader;
  {
    const Unchecked bookkeeping;
    if (g.arrived == 0) {
      g.what = what;
    } else if (std::strcmp(g.what, what) != 0) {
      fail(std::string("divergent collective: one thread at ") + g.what + ", thread " +
           std::to_string(self().linear) + " at " + what);
    }
    g.args[member] = mine;
    gen = g.generation;
    if (orders_memory) hb_release(&g.sync[gen & 1]);
    ++s.progress;
    leader = ++g.arrived == size;
    if (leader) {
      if (orders_memory) hb_acquire(&g.sync[gen & 1]);
      ++g.executed[what];
    }
  }
  if (leader) {
    if (orders_memory) {
      op(g.args);
    } else {
      const Unchecked register_hand_over;
      op(g.args);
    }
    const Unchecked bookkeeping;
    if (orders_memory) hb_release(&g.sync[gen & 1]);
    g.arrived = 0;
    ++g.generation;
    return;
  }
  const Unchecked bookkeeping;
  while (g.generation == gen) yield();
  if (orders_memory) hb_acquire(&g.sync[gen & 1]);
}

inline void check_full_warp(unsigned mask, const char* what) {
  if (mask != 0xFFFFFFFFu) fail(std::string(what) + ": emulated for the full-warp mask only");
  Cta& c = cta();
  if ((warp_id() + 1) * 32 > c.num_threads) fail(std::string(what) + " in a partial warp");
}

template <typename Op>
inline void warp_meet(const char* what, void* mine, Op op, bool orders_memory = false) {
  meet(cta().warps[warp_id()], lane_id(), 32, what, mine, op, orders_memory);
}

template <typename Op>
inline void warpgroup_meet(const char* what, void* mine, Op op) {
  Cta& c = cta();
  const int wg = self().linear / 128;
  if ((wg + 1) * 128 > c.num_threads) fail(std::string(what) + " in a partial warpgroup");
  meet(c.warpgroups[wg], self().linear % 128, 128, what, mine, op);
}

// ---- thread block clusters (sm_90) ----------------------------------------------------------------
inline void require_cluster(const char* what) {
  if (!sched().real_cluster && sched().cluster.size() > 1) {
    fail(std::string(what) + " in a launch without clusters (its CTAs are only co-scheduled here)");
  }
}

// barrier.cluster.arrive{.release | .relaxed}.aligned: a warp instruction (.aligned: the warp's
// lanes arrive together, at the same instruction: a divergent arrive is an error here). Every
// thread of every CTA of the cluster must arrive (an exited thread never does here, so the others
// deadlock; the hardware would let them through, to read a CTA that has gone). With .release this
// thread's writes so far (shared memory included) happen before what any thread of the cluster
// does after its matching wait; .relaxed orders nothing (it only keeps CTAs resident).
inline void cluster_arrive(bool release) {
  Sched& s = sched();
  Thread& t = self();
  {
    const Unchecked bookkeeping;
    if (t.cluster_armed) fail("barrier.cluster.arrive twice without a wait between");
    t.cluster_armed = true;
    t.cluster_phase = s.cluster_generation;  // advances only once this warp has arrived
    if (release) hb_release(&s.cluster_sync[t.cluster_phase & 1]);
  }
  require_cluster("barrier.cluster.arrive");
  check_full_warp(0xFFFFFFFFu, "barrier.cluster.arrive");
  warp_meet(release ? "barrier.cluster.arrive.release" : "barrier.cluster.arrive.relaxed", nullptr,
            [&](std::array<void*, 128>&) {
              const Unchecked bookkeeping;
              s.cluster_arrived += 32;
              if (s.cluster_arrived == s.cluster_threads) {
                s.cluster_arrived = 0;
                ++s.cluster_generation;
              }
            });
}

// barrier.cluster.wait{.acquire}.aligned (acquire is its default): until every thread of the
// cluster has arrived at this thread's phase.
inline void cluster_wait() {
  Sched& s = sched();
  Thread& t = self();
  {
    const Unchecked bookkeeping;
    if (!t.cluster_armed) fail("barrier.cluster.wait without an arrive");
  }
  check_full_warp(0xFFFFFFFFu, "barrier.cluster.wait");
  warp_meet("barrier.cluster.wait", nullptr, [](std::array<void*, 128>&) {});
  const Unchecked bookkeeping;
  while (s.cluster_generation == t.cluster_phase) yield();
  t.cluster_armed = false;
  hb_acquire(&s.cluster_sync[t.cluster_phase & 1]);
}

// mapa.shared::cluster: a shared::cluster address, here the CTA's rank above a shared::cta
// offset (shared windows are under 1 MB).
constexpr uint32_t kClusterAddrTag = 0x40000000u;
constexpr int kClusterRankShift = 20;
inline uint32_t map_shared_rank(uint32_t smem_addr, int rank) {
  const Unchecked bookkeeping;
  require_cluster("mapa");
  const Cta& c = cta();
  const size_t lo = c.dyn_smem - c.smem_block;
  if (smem_addr < lo || smem_addr >= lo + c.dyn_smem_bytes) {
    fail("mapa: shared address outside the CTA's dynamic shared memory");
  }
  if (rank < 0 || rank >= static_cast<int>(sched().cluster.size())) {
    fail("mapa: rank " + std::to_string(rank) + " outside the cluster of " +
         std::to_string(sched().cluster.size()) + " CTAs");
  }
  return kClusterAddrTag | (static_cast<uint32_t>(rank) << kClusterRankShift) | smem_addr;
}

// ld.shared::cluster of a V at a mapa address: the shared memory of that rank's CTA, which must
// still be running (a CTA that has exited has no shared memory to read).
template <typename V>
inline V ld_shared_cluster(uint32_t addr) {
  std::vector<Cta*>& ranks = sched().cluster;
  const Cta* c = nullptr;
  uint32_t offset = 0;
  {
    const Unchecked bookkeeping;
    if ((addr & 0xC0000000u) != kClusterAddrTag) fail("ld.shared::cluster: not a mapa address");
    const uint32_t rank = (addr & ~kClusterAddrTag) >> kClusterRankShift;
    offset = addr & ((1u << kClusterRankShift) - 1);
    if (rank >= ranks.size()) fail("ld.shared::cluster: rank outside the cluster");
    c = ranks[rank];
    if (c->alive == 0) fail("ld.shared::cluster: rank " + std::to_string(rank) + " has exited");
    const size_t lo = c->dyn_smem - c->smem_block;
    if (offset % sizeof(V) != 0) fail("ld.shared::cluster: misaligned address");
    if (offset < lo || offset + sizeof(V) > lo + c->dyn_smem_bytes) {
      fail("ld.shared::cluster: bytes outside that CTA's dynamic shared memory");
    }
  }
  V v;
  std::memcpy(&v, c->smem_block + offset, sizeof(V));
  return v;
}

// ---- shared memory -------------------------------------------------------------------------------
inline uint32_t smem_address(const void* p) {
  Cta& c = cta();
  const auto* b = static_cast<const unsigned char*>(p);
  if (b < c.dyn_smem || b > c.dyn_smem + c.dyn_smem_bytes) {
    fail("shared address of a pointer outside the CTA's dynamic shared memory");
  }
  return static_cast<uint32_t>(b - c.smem_block);
}

// The CTA's dynamic shared memory (`extern __shared__ T name[]` in the kernel source).
inline unsigned char* dynamic_smem() { return cta().dyn_smem; }

// A fixed-size `__shared__` variable (build.py rewrites its declaration to this): storage of the
// running CTA, allocated and poisoned (0xFF) by the first thread to reach the declaration.
template <typename A>
inline A& cta_shared(const char* key) {
  const Unchecked bookkeeping;
  auto& slot = cta().fixed_smem[std::string(key) + ":" + typeid(A).name()];
  if (!slot) {
    slot.reset(new unsigned char[sizeof(A)]);
    std::memset(slot.get(), 0xFF, sizeof(A));
  }
  return *reinterpret_cast<A*>(slot.get());
}

inline unsigned char* smem_ptr(uint32_t addr, size_t bytes, const char* what) {
  Cta& c = cta();
  const size_t lo = c.dyn_smem - c.smem_block;
  if (addr < lo || addr + bytes > lo + c.dyn_smem_bytes) {
    char buf[200];
    std::snprintf(buf, sizeof buf,
                  "%s: shared bytes [%u, %zu) outside the dynamic allocation [%zu, %zu)", what, addr,
                  addr + bytes, lo, lo + c.dyn_smem_bytes);
    fail(buf);
  }
  return c.smem_block + addr;
}

// ---- shared-memory banks -------------------------------------------------------------------------
// 32 banks of 4 bytes; a 16-byte access (cp.async.16, an ldmatrix row) covers the aligned group of
// 4 banks (address / 16) % 8. A warp's 16-byte accesses are served in phases of 8 lanes (quarter
// warps; for ldmatrix.x4, the 8 rows of one matrix), a phase in as many wavefronts as the most
// distinct 16-byte lines that one bank group holds in it (lanes on one line share it): 1 when the
// phase's lines lie in 8 distinct bank groups, 8 when all sit in one.
inline void count_banks(const char* what, const std::array<uint32_t, 32>& addr) {
  BankStats& b = device().banks[what];
  ++b.requests;
  for (int phase = 0; phase < 4; ++phase) {
    uint32_t lines[8];
    int distinct = 0, per_group[8] = {};
    for (int i = 0; i < 8; ++i) {
      const uint32_t line = addr[8 * phase + i] / 16;
      if (std::find(lines, lines + distinct, line) != lines + distinct) continue;
      lines[distinct++] = line;
      ++per_group[line % 8];
    }
    b.wavefronts += *std::max_element(per_group, per_group + 8);
    b.ideal += 1;
  }
}

// A lane's n-th cp.async meets its warp's other lanes' n-th (the kernels' copy loops are uniform
// across a warp; issues that never meet a full warp are counted as unpaired).
inline void count_cp_async_banks(uint32_t smem_addr) {
  const Unchecked bookkeeping;
  Thread& t = self();
  auto& pending = cta().cp_lanes[warp_id()];
  const long long n = t.cp_issued++;
  auto& [arrived, addr] = pending[n];
  addr[lane_id()] = smem_addr;
  if (++arrived == 32) {
    count_banks("cp.async.16", addr);
    pending.erase(n);
  }
}

// ---- cp.async ------------------------------------------------------------------------------------
// Performs this thread's copies (generic-proxy writes: wgmma may read them only after the
// thread's next fence.proxy.async).
inline void run_copies(const std::vector<CpAsyncCopy>& copies) {
  for (const CpAsyncCopy& c : copies) {
    if (c.src) {
      std::memcpy(c.dst, c.src, 16);
    } else {
      std::memset(c.dst, 0, 16);
    }
    const Unchecked bookkeeping;
    const auto chunk = static_cast<uint32_t>((c.dst - cta().smem_block) / 16);
    cta().generic_writer[chunk] = self().linear;
    self().unfenced.push_back(chunk);
  }
}

// fence.proxy.async.shared::cta: this thread's shared-memory writes so far (here: its completed
// cp.async copies) become visible to async-proxy reads (wgmma operands) ordered after it.
inline void fence_proxy_async() {
  const Unchecked bookkeeping;
  Thread& t = self();
  std::vector<int>& writer = cta().generic_writer;
  for (const uint32_t chunk : t.unfenced) {
    if (writer[chunk] == t.linear) writer[chunk] = -1;
  }
  t.unfenced.clear();
}

inline void cp_async_16(uint32_t smem_addr, const void* gmem, bool in_range) {
  if (smem_addr % 16 != 0) fail("cp.async: shared address not 16-byte aligned");
  if (in_range && reinterpret_cast<uintptr_t>(gmem) % 16 != 0) {
    fail("cp.async: global address not 16-byte aligned");
  }
  const CpAsyncCopy c{smem_ptr(smem_addr, 16, "cp.async"),
                      in_range ? static_cast<const unsigned char*>(gmem) : nullptr};
  count_cp_async_banks(smem_addr);
  if (device().early) run_copies({c});
  if (device().late) self().open_copies.push_back(c);
}

inline void cp_async_commit() {
  Thread& t = self();
  t.copy_groups.push_back(std::move(t.open_copies));
  t.open_copies.clear();
}

inline void cp_async_wait(int pending) {
  Thread& t = self();
  while (static_cast<int>(t.copy_groups.size()) > pending) {
    run_copies(t.copy_groups.front());
    t.copy_groups.pop_front();
  }
}

// ---- warp instructions ---------------------------------------------------------------------------
template <typename T>
inline float b16_to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return bf16_bits_to_f32(bits);
  } else {
    return f16_bits_to_f32(bits);
  }
}

struct LdmatrixArgs {
  uint32_t addr;
  uint32_t* r;
};

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr, bool trans) {
  if (smem_addr % 16 != 0) fail("ldmatrix: row address not 16-byte aligned");
  LdmatrixArgs mine{smem_addr, r};
  const char* what = trans ? "ldmatrix.x4.trans" : "ldmatrix.x4";
  warp_meet(what, &mine, [&](std::array<void*, 128>& args) {
    std::array<uint32_t, 32> rows;  // lane 8 j + i: row i of matrix j
    for (int lane = 0; lane < 32; ++lane) rows[lane] = static_cast<LdmatrixArgs*>(args[lane])->addr;
    count_banks(what, rows);
    uint16_t m[4][8][8];  // matrix j, row, element
    for (int j = 0; j < 4; ++j) {
      for (int row = 0; row < 8; ++row) {
        const auto* a = static_cast<LdmatrixArgs*>(args[8 * j + row]);
        const unsigned char* src = smem_ptr(a->addr, 16, "ldmatrix");
        const Checked shared_memory;
        std::memcpy(m[j][row], src, 16);
      }
    }
    for (int lane = 0; lane < 32; ++lane) {
      auto* a = static_cast<LdmatrixArgs*>(args[lane]);
      for (int j = 0; j < 4; ++j) {
        uint16_t lo, hi;
        if (!trans) {
          lo = m[j][lane / 4][2 * (lane % 4)];
          hi = m[j][lane / 4][2 * (lane % 4) + 1];
        } else {
          lo = m[j][2 * (lane % 4)][lane / 4];
          hi = m[j][2 * (lane % 4) + 1][lane / 4];
        }
        a->r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
    }
  });
}

struct MmaArgs {
  float* d;
  const uint32_t* a;
  uint32_t b0, b1;
};

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: D = A B + C, sums in double, one rounding.
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaArgs mine{d, a, b0, b1};
  warp_meet("mma.m16n8k16", &mine, [&](std::array<void*, 128>& args) {
    double A[16][16], B[16][8], C[16][8];
    auto lo = [](uint32_t v) { return b16_to_float<T>(static_cast<uint16_t>(v & 0xFFFF)); };
    auto hi = [](uint32_t v) { return b16_to_float<T>(static_cast<uint16_t>(v >> 16)); };
    for (int lane = 0; lane < 32; ++lane) {
      const auto* m = static_cast<MmaArgs*>(args[lane]);
      const int g = lane / 4, t = lane % 4;
      for (int i = 0; i < 4; ++i) {  // a0 A[g][2t..], a1 A[g+8][2t..], a2 A[g][2t+8..], a3 A[g+8][2t+8..]
        const int row = g + 8 * (i % 2), col = 2 * t + 8 * (i / 2);
        A[row][col] = lo(m->a[i]);
        A[row][col + 1] = hi(m->a[i]);
      }
      B[2 * t][g] = lo(m->b0);
      B[2 * t + 1][g] = hi(m->b0);
      B[2 * t + 8][g] = lo(m->b1);
      B[2 * t + 9][g] = hi(m->b1);
      C[g][2 * t] = m->d[0];
      C[g][2 * t + 1] = m->d[1];
      C[g + 8][2 * t] = m->d[2];
      C[g + 8][2 * t + 1] = m->d[3];
    }
    for (int lane = 0; lane < 32; ++lane) {
      auto* m = static_cast<MmaArgs*>(args[lane]);
      const int g = lane / 4, t = lane % 4;
      for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
        double acc = C[row][col];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        m->d[i] = static_cast<float>(acc);
      }
    }
  });
}

template <typename V>
struct ShflArgs {
  V v;
  V out;
};

template <typename V, typename Src>
inline V shuffle(const char* what, V v, Src src_lane) {
  ShflArgs<V> mine{v, v};
  warp_meet(what, &mine, [&](std::array<void*, 128>& args) {
    V vals[32];
    for (int l = 0; l < 32; ++l) vals[l] = static_cast<ShflArgs<V>*>(args[l])->v;
    for (int l = 0; l < 32; ++l) static_cast<ShflArgs<V>*>(args[l])->out = vals[src_lane(l)];
  });
  return mine.out;
}

// ex2.approx.ftz.f32 (the hardware's is within 2 ulp; subnormal inputs and results flush to 0)
inline float ex2_approx_ftz(float x) {
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

// __expf: exp2 of x * log2(e) (the product rounded to fp32, as FMUL does); the build's SASS
// scales subnormal results around MUFU.EX2 rather than flushing them
inline float fast_expf(float x) { return std::exp2(x * 1.44269504088896341f); }

// __fdividef: x times rcp.approx.ftz(y) (a reciprocal below the normal range flushes to 0:
// CUDA's "returns 0 for 2^126 < |y| < 2^128")
inline float fast_fdividef(float x, float y) {
  float r = 1.0f / y;
  if (std::fpclassify(r) == FP_SUBNORMAL) r = std::copysign(0.0f, r);
  return x * r;
}

// st.global.v4.b32
inline void store_global_16(void* p, const void* src) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("st.global.v4: address not 16-byte aligned");
  std::memcpy(p, src, 16);
}

// ---- wgmma ---------------------------------------------------------------------------------------
struct WgmmaOp {
  int n = 0;            // N of m64nNk16
  bool a_regs = false;  // A from registers (RS)
  bool b_mn = false;    // RS only: B MN-major (tnsp-b = 1), else K-major
  uint64_t desc_a = 0, desc_b = 0;
  std::array<float*, 128> d{};
  std::array<const uint32_t*, 128> a{};  // RS: each thread's four A registers
  bool bf16 = true;
};

struct WgmmaArgs {
  float* d;
  const uint32_t* a;
  uint64_t desc_a, desc_b;
};

inline uint32_t swizzle128(uint32_t addr) { return addr ^ ((addr >> 3) & 0x70); }

struct Desc {
  uint32_t start, leading, stride;
};
inline Desc decode_desc(uint64_t d, const char* what) {
  if ((d >> 62) != 1) fail(std::string(what) + ": descriptor layout is not SWIZZLE_128B");
  if (((d >> 49) & 7) != 0) fail(std::string(what) + ": descriptor base offset not 0");
  return {static_cast<uint32_t>((d & 0x3FFF) << 4), static_cast<uint32_t>(((d >> 16) & 0x3FFF) << 4),
          static_cast<uint32_t>(((d >> 32) & 0x3FFF) << 4)};
}

inline float read_b16(uint32_t addr, bool bf16, const char* what) {
  uint16_t bits;
  std::memcpy(&bits, smem_ptr(addr, 2, what), 2);
  {
    const Unchecked bookkeeping;
    const int writer = cta().generic_writer[addr / 16];
    if (writer >= 0) {
      fail(std::string(what) + ": shared bytes at " + std::to_string(addr & ~15u) +
           " were written by thread " + std::to_string(writer) +
           "'s cp.async with no fence.proxy.async by that thread since (the async proxy need not "
           "see them)");
    }
  }
  return bf16 ? bf16_bits_to_f32(bits) : f16_bits_to_f32(bits);
}

// K-major SW128 operand element (row r, k): 128-byte rows, 8-row groups `stride` apart, the
// swizzle applied to the absolute address (PTX ISA, shared memory matrix layouts).
inline float kmajor(const Desc& d, int r, int k, bool bf16) {
  const uint32_t logical = d.start + (r / 8) * d.stride + (r % 8) * 128 + k * 2;
  return read_b16(swizzle128(logical), bf16, "wgmma K-major operand");
}
// MN-major SW128 operand element (k, n): rows along K of 64 N-elements, 8-row groups `stride`
// apart along K, 64-element column blocks `leading` apart along N.
inline float mnmajor(const Desc& d, int k, int n, bool bf16) {
  const uint32_t logical = d.start + (n / 64) * d.leading + (n % 64) * 2 + (k % 8) * 128 +
                           (k / 8) * d.stride;
  return read_b16(swizzle128(logical), bf16, "wgmma MN-major operand");
}

// Reads the operands and, with `compute`, accumulates (without: the issue-time read of
// EMU_ASYNC=both, for the race checker).
inline void run_wgmma(const WgmmaOp& op, bool compute = true) {
  const Desc db = decode_desc(op.desc_b, "wgmma B");
  std::vector<double> A(64 * 16), B(op.n * 16);
  if (!op.a_regs) {
    const Desc da = decode_desc(op.desc_a, "wgmma A");
    const Checked shared_memory;
    for (int m = 0; m < 64; ++m)
      for (int k = 0; k < 16; ++k) A[m * 16 + k] = kmajor(da, m, k, op.bf16);
    for (int n = 0; n < op.n; ++n)
      for (int k = 0; k < 16; ++k) B[n * 16 + k] = kmajor(db, n, k, op.bf16);
  } else {
    for (int th = 0; th < 128; ++th) {  // warp w's mma.m16n8k16 A fragment of rows 16 w ..
      const int w = th / 32, lane = th % 32, g = lane / 4, t = lane % 4;
      for (int i = 0; i < 4; ++i) {
        const int row = 16 * w + g + 8 * (i % 2), col = 2 * t + 8 * (i / 2);
        const uint32_t v = op.a[th][i];
        A[row * 16 + col] = op.bf16 ? bf16_bits_to_f32(v & 0xFFFF) : f16_bits_to_f32(v & 0xFFFF);
        A[row * 16 + col + 1] = op.bf16 ? bf16_bits_to_f32(v >> 16) : f16_bits_to_f32(v >> 16);
      }
    }
    const Checked shared_memory;
    for (int n = 0; n < op.n; ++n)
      for (int k = 0; k < 16; ++k)
        B[n * 16 + k] = op.b_mn ? mnmajor(db, k, n, op.bf16) : kmajor(db, n, k, op.bf16);
  }
  if (!compute) return;
  for (int th = 0; th < 128; ++th) {  // accumulators: the mma C fragments of n8 blocks j
    const int w = th / 32, lane = th % 32, g = lane / 4, t = lane % 4;
    for (int j = 0; j < op.n / 8; ++j) {
      for (int i = 0; i < 4; ++i) {
        const int row = 16 * w + g + 8 * (i / 2), col = 8 * j + 2 * t + (i % 2);
        double acc = op.d[th][4 * j + i];
        for (int k = 0; k < 16; ++k) acc += A[row * 16 + k] * B[col * 16 + k];
        op.d[th][4 * j + i] = static_cast<float>(acc);
      }
    }
  }
}

inline int warpgroup_id() { return self().linear / 128; }

template <typename T>
inline void wgmma_issue(const char* what, int n, float* d, const uint32_t* a, uint64_t desc_a,
                        uint64_t desc_b, bool b_mn = false) {
  WgmmaArgs mine{d, a, desc_a, desc_b};
  const int wg = warpgroup_id();
  warpgroup_meet(what, &mine, [&](std::array<void*, 128>& args) {
    WgmmaOp op;
    op.n = n;
    op.a_regs = a != nullptr;
    op.b_mn = b_mn;
    op.bf16 = std::is_same_v<T, __nv_bfloat16>;
    const auto* first = static_cast<WgmmaArgs*>(args[0]);
    op.desc_a = first->desc_a;
    op.desc_b = first->desc_b;
    if (!cta().wgmma_fenced[wg]) {
      fail(std::string(what) + " with no wgmma.fence since the warpgroup's start or its last "
                               "wgmma.wait_group (whose results its threads may have touched)");
    }
    for (int th = 0; th < 128; ++th) {
      const auto* m = static_cast<WgmmaArgs*>(args[th]);
      if (m->desc_b != op.desc_b || (!op.a_regs && m->desc_a != op.desc_a)) {
        fail(std::string(what) + ": descriptors differ across the warpgroup");
      }
      op.d[th] = m->d;
      op.a[th] = m->a;
    }
    if (!device().late) {
      run_wgmma(op);
    } else {
      if (device().early) run_wgmma(op, /*compute=*/false);
      cta().wgmma_open[wg].push_back(op);
    }
  });
}

inline void wgmma_commit() {
  const int wg = warpgroup_id();
  warpgroup_meet("wgmma.commit_group", nullptr, [&](std::array<void*, 128>&) {
    Cta& c = cta();
    c.wgmma_groups[wg].push_back(std::move(c.wgmma_open[wg]));
    c.wgmma_open[wg].clear();
  });
}

inline void wgmma_wait(int pending) {
  const int wg = warpgroup_id();
  warpgroup_meet("wgmma.wait_group", nullptr, [&](std::array<void*, 128>&) {
    auto& groups = cta().wgmma_groups[wg];
    while (static_cast<int>(groups.size()) > pending) {
      for (const WgmmaOp& op : groups.front()) run_wgmma(op);
      groups.pop_front();
    }
    cta().wgmma_fenced[wg] = 0;
  });
}

inline void wgmma_fence() {
  const int wg = warpgroup_id();
  warpgroup_meet("wgmma.fence", nullptr, [&](std::array<void*, 128>&) { cta().wgmma_fenced[wg] = 1; });
}

// ---- launches ------------------------------------------------------------------------------------
inline void fiber_main(Thread* t);

extern "C" inline void emu_fiber_entry(void* arg) { fiber_main(static_cast<Thread*>(arg)); }

inline std::function<void()>& current_body() {
  static std::function<void()> body;
  return body;
}

inline void fiber_main(Thread* t) {
#if defined(EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &sched().main_stack_bottom, &sched().main_stack_size);
#endif
  Sched& s = sched();
  try {
    current_body()();
    if (!t->open_copies.empty()) fail("a thread exits with cp.async copies never committed");
    for (const auto& g : t->copy_groups) {
      if (!g.empty()) fail("a thread exits with cp.async copies never waited for");
    }
  } catch (const std::exception& e) {
    const Unchecked bookkeeping;
    if (!s.failed) {
      s.failed = true;
      char where[160];
      std::snprintf(where, sizeof where, " (block (%u, %u, %u), thread %d)", s.cta->block_idx.x,
                    s.cta->block_idx.y, s.cta->block_idx.z, t->linear);
      s.error = e.what() + std::string(where);
    }
  }
  {
    const Unchecked bookkeeping;
    t->done = true;
    --s.cta->alive;
    ++s.progress;
  }
  hb_release(&s.cta->end_sync);
  yield(/*dying=*/true);
  std::abort();  // never resumed
}

// Runs one cluster of CTAs of `body` to completion (a launch without clusters: one CTA each, or
// EMU_COSCHEDULE of them, not a cluster): their threads side by side, CTA after CTA in each round
// (reversed with EMU_ORDER=reverse).
inline void run_cluster(std::vector<Cta*>& ctas, bool real_cluster) {
  Sched& s = sched();
  const Unchecked bookkeeping;  // the scheduler's side
  s.cluster = ctas;
  s.real_cluster = real_cluster;
#if defined(EMU_TSAN)
  s.tsan_main = __tsan_get_current_fiber();
#endif
  const int per_cta = ctas.front()->num_threads;
  const int total = per_cta * static_cast<int>(ctas.size());
  while (static_cast<int>(s.stack_pool.size()) < total) {
    void* m = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fail("emulator: out of memory for thread stacks");
    s.stack_pool.push_back(static_cast<unsigned char*>(m));
  }
  s.cluster_threads = total;
  s.cluster_arrived = 0;
  for (size_t rank = 0; rank < ctas.size(); ++rank) {
    Cta& c = *ctas[rank];
    const int n = c.num_threads;
    c.threads.assign(n, Thread{});
    for (int i = 0; i < n; ++i) {
      Thread& t = c.threads[i];
      const int g = static_cast<int>(rank) * per_cta + i;  // the thread's stack and fiber
      t.linear = i;
      t.cta = &c;
      t.tid = dim3(i % c.block_dim.x, (i / c.block_dim.x) % c.block_dim.y,
                   i / (c.block_dim.x * c.block_dim.y));
      t.stack = s.stack_pool[g];
#if defined(EMU_ASAN)
      // a stack left by a thread that switched away for good keeps its frames' redzones
      ASAN_UNPOISON_MEMORY_REGION(t.stack, kStackBytes);
#endif
      // Initial frame for emu_switch: control words, r15..rbp, return into emu_fiber_start with
      // r12 = the thread, r13 = the entry (16-byte aligned stack at the call).
      auto* top = reinterpret_cast<uint64_t*>(t.stack + kStackBytes);
      uint64_t* sp = top - 3;  // return address slot at top - 24
      sp[0] = reinterpret_cast<uint64_t>(&emu_fiber_start);
      uint64_t* frame = sp - 7;
      frame[0] = 0x037F00001F80ull;  // mxcsr (low 32 bits), x87 control word (bits 32-47)
      frame[1] = 0;                  // r15
      frame[2] = 0;                  // r14
      frame[3] = reinterpret_cast<uint64_t>(&emu_fiber_entry);  // r13
      frame[4] = reinterpret_cast<uint64_t>(&t);                 // r12
      frame[5] = 0;                                              // rbx
      frame[6] = 0;                                              // rbp
      t.sp = frame;
#if defined(EMU_TSAN)
      // one TSan fiber per thread slot, reused by every cluster (clusters are ordered anyway):
      // creating and destroying them per CTA costs more than the kernels
      while (static_cast<int>(s.tsan_pool.size()) <= g) s.tsan_pool.push_back(__tsan_create_fiber(0));
      t.tsan_fiber = s.tsan_pool[g];
#endif
    }
    c.alive = n;
    c.warps.assign((n + 31) / 32, Collective{});
    c.warpgroups.assign((n + 127) / 128, Collective{});
    c.wgmma_open.assign(c.warpgroups.size(), {});
    c.wgmma_groups.assign(c.warpgroups.size(), {});
    c.cp_lanes.assign(c.warps.size(), {});
    c.wgmma_fenced.assign(c.warpgroups.size(), 0);
    c.generic_writer.assign((c.dyn_smem - c.smem_block + c.dyn_smem_bytes) / 16 + 1, -1);
  }
  const auto alive = [&] {
    for (const Cta* c : ctas) {
      if (c->alive > 0) return true;
    }
    return false;
  };
  unsigned long long last_progress = ~0ull;
  while (alive() && !s.failed) {
    if (s.progress == last_progress) {
      s.failed = true;
      std::string at;
      for (const Cta* c : ctas) {
        for (const Collective& w : c->warps) {
          if (w.arrived) at += std::string(" ") + w.what + " (" + std::to_string(w.arrived) + "/32)";
        }
        for (const Collective& w : c->warpgroups) {
          if (w.arrived) at += std::string(" ") + w.what + " (" + std::to_string(w.arrived) + "/128)";
        }
        if (c->barrier_arrived) at += " __syncthreads (" + std::to_string(c->barrier_arrived) + "/" +
                                      std::to_string(c->alive) + " alive)";
      }
      if (s.cluster_arrived) at += " barrier.cluster (" + std::to_string(s.cluster_arrived) + "/" +
                                   std::to_string(s.cluster_threads) + ")";
      const Cta& c0 = *ctas.front();
      char where[96];
      std::snprintf(where, sizeof where, "deadlock in block (%u, %u, %u)%s: waiting at",
                    c0.block_idx.x, c0.block_idx.y, c0.block_idx.z,
                    ctas.size() > 1 ? "'s cluster" : "");
      s.error = where + at;
      break;
    }
    last_progress = s.progress;
    const int m = static_cast<int>(ctas.size());
    for (int r = 0; r < m && !s.failed; ++r) {
      Cta& c = *ctas[device().reverse ? m - 1 - r : r];
      const int n = c.num_threads;
      for (int k = 0; k < n && !s.failed; ++k) {
        Thread& t = c.threads[device().reverse ? n - 1 - k : k];
        if (t.done) continue;
        // A barrier completes when the last *alive* thread arrives; threads that exit count.
        if (c.barrier_arrived > 0 && c.barrier_arrived == c.alive) {
          c.barrier_arrived = 0;
          ++c.barrier_generation;
          ++s.progress;
        }
        s.cta = &c;
        s.cur = &t;
        switch_to(&s.sp, t.sp, t.stack, kStackBytes, false, t.tsan_fiber, true);
        s.cur = nullptr;
      }
    }
  }
  for (Cta* cp : ctas) {
    Cta& c = *cp;
    hb_acquire(&c.end_sync);  // the next cluster runs after this one (races between clusters: not checked)
    for (const auto* groups : {&c.warps, &c.warpgroups}) {
      for (const Collective& g : *groups) {
        for (const auto& [what, n] : g.executed) device().executed[what] += n;
      }
    }
    for (const auto& pending : c.cp_lanes) {
      for (const auto& [n, lanes] : pending) device().banks["cp.async.16"].unpaired += lanes.first;
    }
    for (size_t wg = 0; wg < c.wgmma_open.size() && !s.failed; ++wg) {
      if (!c.wgmma_open[wg].empty() || !c.wgmma_groups[wg].empty()) {
        s.failed = true;
        s.error = "a warpgroup exits with wgmma never committed or waited for";
      }
    }
  }
  s.cta = nullptr;
  s.cluster.clear();
}

class Launch {
 public:
  Launch(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr)
      : grid_(grid), block_(block), smem_(smem) {}

  // Clusters of `shape` CTAs (cudaLaunchKernelEx's cluster attribute): the grid a multiple of it,
  // at most 8 CTAs, or 16 for a kernel that opted in (cudaFuncAttributeNonPortableClusterSizeAllowed).
  Launch& cluster(dim3 shape) {
    cluster_ = shape;
    return *this;
  }

  template <typename... Params, typename... Args>
  void run(void (*kernel)(Params...), Args&&... args) {
    Device& dev = device();
    ++dev.launches;
    const int threads = static_cast<int>(block_.x * block_.y * block_.z);
    const int allowed = std::max(dev.default_smem, dev.smem_optin.count((const void*)kernel)
                                                       ? dev.smem_optin[(const void*)kernel]
                                                       : 0);
    if (threads < 1 || threads > 1024 || grid_.x < 1 || grid_.y < 1 || grid_.z < 1 ||
        grid_.x > 2147483647u || grid_.y > 65535 || grid_.z > 65535) {
      dev.last_error = cudaErrorInvalidConfiguration;
      return;
    }
    if (static_cast<int>(smem_) > allowed) {
      dev.last_error = cudaErrorInvalidValue;
      return;
    }
    const unsigned cluster_size = cluster_.x * cluster_.y * cluster_.z;
    if (cluster_size > 1) {
      const unsigned most = dev.nonportable_cluster.count((const void*)kernel) ? 16 : 8;
      if (dev.cc < 90 || cluster_size > most || grid_.x % cluster_.x != 0 ||
          grid_.y % cluster_.y != 0 || grid_.z % cluster_.z != 0) {
        dev.last_error = cudaErrorInvalidConfiguration;
        return;
      }
    }
    std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    Sched& s = sched();
    s.grid = grid_;
    current_body() = [&] { std::apply(kernel, params); };
    const size_t block_bytes = dev.dyn_smem_offset + smem_;
    // Clusters (single CTAs without them) one after another, in the scheduling order too
    // (reverse: the last first), so a result that depends on which CTA of a launch runs first or
    // last differs between the orders. A cluster's CTAs: rank = x + y cx + z cx cy in it. Without
    // clusters, EMU_COSCHEDULE consecutive CTAs of that order run side by side instead (a
    // protocol between CTAs -- split-KV's arrival marks, GEMM2's combine counters -- then meets
    // its interleavings: more than one CTA seeing itself last, a reset racing a reader).
    const auto pick = [&](unsigned i, unsigned n) { return dev.reverse ? n - 1 - i : i; };
    const dim3 clusters(grid_.x / cluster_.x, grid_.y / cluster_.y, grid_.z / cluster_.z);
    const unsigned together = cluster_size > 1 ? cluster_size : static_cast<unsigned>(std::max(dev.coschedule, 1));
    std::vector<dim3> order;  // the CTAs, each cluster's in rank order
    for (unsigned zi = 0; zi < clusters.z; ++zi) {
      for (unsigned yi = 0; yi < clusters.y; ++yi) {
        for (unsigned xi = 0; xi < clusters.x; ++xi) {
          const dim3 first(pick(xi, clusters.x) * cluster_.x, pick(yi, clusters.y) * cluster_.y,
                           pick(zi, clusters.z) * cluster_.z);
          for (unsigned r = 0; r < cluster_size; ++r) {
            order.push_back(dim3(first.x + r % cluster_.x, first.y + (r / cluster_.x) % cluster_.y,
                                 first.z + r / (cluster_.x * cluster_.y)));
          }
        }
      }
    }
    for (size_t at = 0; at < order.size(); at += together) {
      const unsigned n = static_cast<unsigned>(std::min<size_t>(together, order.size() - at));
      std::vector<Cta> members(n);
      std::vector<std::vector<unsigned char>> storage(n);
      std::vector<Cta*> ranks;
      for (unsigned r = 0; r < n; ++r) {
        Cta& c = members[r];
        c.block_idx = order[at + r];
        c.block_dim = block_;
        c.num_threads = threads;
        storage[r].resize(block_bytes + 1024 + 16);
        // shared address 0 on a 1024-byte boundary, as the hardware's window
        auto* base = reinterpret_cast<unsigned char*>(
            (reinterpret_cast<uintptr_t>(storage[r].data()) + 1023) & ~uintptr_t{1023});
        c.smem_block = base;
        c.dyn_smem = base + dev.dyn_smem_offset;
        c.dyn_smem_bytes = smem_;
        std::memset(c.dyn_smem, 0xFF, smem_);  // poison: NaN in every float format
        ranks.push_back(&c);
      }
      run_cluster(ranks, /*real_cluster=*/cluster_size > 1);
      if (s.failed) {
        const std::string e = s.error;
        s.failed = false;
        s.error.clear();
        throw Error(e);
      }
    }
  }

 private:
  dim3 grid_, block_;
  size_t smem_;
  dim3 cluster_{1, 1, 1};
};

}  // namespace emu

// ---- CUDA built-ins ------------------------------------------------------------------------------
#define threadIdx (::emu::self().tid)
#define blockIdx (::emu::cta().block_idx)
#define blockDim (::emu::cta().block_dim)
#define gridDim (::emu::sched().grid)

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  emu::check_full_warp(mask, "__syncwarp");
  emu::warp_meet("__syncwarp", nullptr, [](std::array<void*, 128>&) {}, /*orders_memory=*/true);
}
[[noreturn]] inline void __trap() { emu::fail("__trap() called"); }
inline float __expf(float x) { return emu::fast_expf(x); }
inline float __fdividef(float x, float y) { return emu::fast_fdividef(x, y); }
inline unsigned __cvta_generic_to_shared(const void* p) { return emu::smem_address(p); }

template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
  emu::check_full_warp(mask, "__shfl_xor_sync");
  return emu::shuffle("shfl.bfly", v, [&](int l) {
    const int src = l ^ lane_mask;
    return (src / width == l / width) ? src : l;
  });
}
// shfl.idx: every lane names its own source lane (within its width-wide segment).
template <typename V>
inline V __shfl_sync(unsigned mask, V v, int src_lane, int width = 32) {
  emu::check_full_warp(mask, "__shfl_sync");
  struct A {
    V v;
    int src;
    V out;
  } mine{v, src_lane, v};
  emu::warp_meet("shfl.idx", &mine, [&](std::array<void*, 128>& args) {
    V vals[32];
    for (int l = 0; l < 32; ++l) vals[l] = static_cast<A*>(args[l])->v;
    for (int l = 0; l < 32; ++l) {
      A* a = static_cast<A*>(args[l]);
      a->out = vals[(l / width) * width + (a->src % width + width) % width];
    }
  });
  return mine.out;
}
template <typename V>
inline V __shfl_up_sync(unsigned mask, V v, unsigned delta, int width = 32) {
  emu::check_full_warp(mask, "__shfl_up_sync");
  return emu::shuffle("shfl.up", v, [&](int l) {
    const int src = l - static_cast<int>(delta);
    return (src >= (l / width) * width) ? src : l;
  });
}
template <typename V>
inline unsigned __match_any_sync(unsigned mask, V v) {
  emu::check_full_warp(mask, "__match_any_sync");
  struct A {
    V v;
    unsigned out;
  } mine{v, 0};
  emu::warp_meet("match.any", &mine, [&](std::array<void*, 128>& args) {
    for (int l = 0; l < 32; ++l) {
      unsigned m = 0;
      for (int o = 0; o < 32; ++o) {
        if (static_cast<A*>(args[o])->v == static_cast<A*>(args[l])->v) m |= 1u << o;
      }
      static_cast<A*>(args[l])->out = m;
    }
  });
  return mine.out;
}
// redux.sync: `op` folds the 32 lanes' values (lane order), every lane gets the result.
template <typename V, typename Op>
inline V emu_reduce_sync(const char* what, unsigned mask, V v, Op op) {
  emu::check_full_warp(mask, what);
  struct A {
    V v, out;
  } mine{v, 0};
  emu::warp_meet(what, &mine, [&](std::array<void*, 128>& args) {
    V r = static_cast<A*>(args[0])->v;
    for (int l = 1; l < 32; ++l) r = op(r, static_cast<A*>(args[l])->v);
    for (int l = 0; l < 32; ++l) static_cast<A*>(args[l])->out = r;
  });
  return mine.out;
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
  return emu_reduce_sync("redux.max", mask, v, [](unsigned a, unsigned b) { return std::max(a, b); });
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
  return emu_reduce_sync("redux.min", mask, v, [](unsigned a, unsigned b) { return std::min(a, b); });
}
inline int __reduce_add_sync(unsigned mask, int v) {  // wraps modulo 2^32, as the hardware's
  return static_cast<int>(emu_reduce_sync("redux.add", mask, static_cast<unsigned>(v),
                                          [](unsigned a, unsigned b) { return a + b; }));
}
inline int __all_sync(unsigned mask, int predicate) {
  return static_cast<int>(emu_reduce_sync("vote.all", mask, static_cast<unsigned>(predicate != 0),
                                          [](unsigned a, unsigned b) { return std::min(a, b); }));
}
// Relaxed atomic read-modify-writes, as CUDA's (no ordering: ThreadSanitizer sees atomics, not
// synchronization).
template <typename V>
inline V atomicAdd(V* p, V v) {
  if constexpr (std::is_integral_v<V>) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
  } else {
    V old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange(p, &old, &(const V&)(old + v), true, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED)) {
    }
    return old;
  }
}

template <typename V>
inline V atomicExch(V* p, V v) {
  return __atomic_exchange_n(p, v, __ATOMIC_RELAXED);
}

// A device-wide fence: CTAs run one after another here (or co-scheduled ones interleave at their
// threads' meeting points), and every write is visible at once; within a CTA only barriers order
// (ThreadSanitizer's view, as CUDA's). With co-scheduled CTAs the fence is also a point where the
// thread lets the others run: the cross-CTA protocols interleave between their fences.
inline void __threadfence() {
  emu::Sched& s = emu::sched();
  if (s.cluster.size() > 1) {
    {
      const emu::Unchecked bookkeeping;
      ++s.progress;
    }
    emu::yield();
  }
}

// ---- runtime API ---------------------------------------------------------------------------------
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::device().last_error;
  emu::device().last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu::device().last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure";
  }
}
// Stream-ordered memset: launches run to completion in order, so it runs now.
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const emu::Device& dev = emu::device();
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = dev.sms; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = dev.cc / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = dev.cc % 10; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <typename K>
inline cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute attr, int value) {
  emu::Device& dev = emu::device();
  if (attr == cudaFuncAttributeNonPortableClusterSizeAllowed && dev.cc >= 90) {
    if (value) dev.nonportable_cluster.insert(reinterpret_cast<const void*>(kernel));
    return cudaSuccess;
  }
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > dev.max_smem_optin) {
    return dev.last_error = cudaErrorInvalidValue;
  }
  dev.smem_optin[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
#pragma push_macro("gridDim")
#pragma push_macro("blockDim")
#undef gridDim
#undef blockDim
// The launch attributes the kernels use: a cluster shape (run as Launch::cluster does) and
// programmatic stream serialization (launches run to completion in order here anyway).
template <typename... Params, typename... Args>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...),
                                      Args&&... args) {
  dim3 cluster(1, 1, 1);
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    const cudaLaunchAttribute& a = config->attrs[i];
    if (a.id == cudaLaunchAttributeClusterDimension) {
      cluster = dim3(a.val.clusterDim.x, a.val.clusterDim.y, a.val.clusterDim.z);
    } else if (a.id != cudaLaunchAttributeProgrammaticStreamSerialization) {
      return emu::device().last_error = cudaErrorInvalidValue;
    }
  }
  emu::Launch(config->gridDim, config->blockDim, config->dynamicSmemBytes, config->stream)
      .cluster(cluster)
      .run(kernel, std::forward<Args>(args)...);
  return cudaPeekAtLastError();
}
// Resident CTAs from shared memory and threads only (registers are the compiler's: ptxas -v).
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K*, int threads,
                                                                 size_t smem) {
  const emu::Device& dev = emu::device();
  const int by_smem = dev.smem_per_sm / static_cast<int>(smem + dev.reserved_smem_per_cta);
  *n = std::max(0, std::min({by_smem, dev.threads_per_sm / std::max(threads, 1), dev.ctas_per_sm}));
  return cudaSuccess;
}
// Clusters of the config's shape that fit the device at once: a cluster's CTAs share one GPC of
// kSmsPerGpc SMs here (H100: 7 or 8 GPCs of up to 18 SMs; the model only has to say whether one
// fits), each SM holding as many as cudaOccupancyMaxActiveBlocksPerMultiprocessor allows.
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveClusters(int* n, K* kernel, const cudaLaunchConfig_t* config) {
  constexpr int kSmsPerGpc = 16;
  const emu::Device& dev = emu::device();
  dim3 cluster(1, 1, 1);
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      const auto& d = config->attrs[i].val.clusterDim;
      cluster = dim3(d.x, d.y, d.z);
    }
  }
  const int size = static_cast<int>(cluster.x * cluster.y * cluster.z);
  const int most = dev.nonportable_cluster.count(reinterpret_cast<const void*>(kernel)) ? 16 : 8;
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel,
                                                static_cast<int>(config->blockDim.x * config->blockDim.y *
                                                                 config->blockDim.z),
                                                config->dynamicSmemBytes);
  if (dev.cc < 90 || size > most || per_sm < 1) {
    *n = 0;
    return cudaSuccess;
  }
  const int per_gpc = kSmsPerGpc * per_sm / size;  // clusters one GPC holds
  *n = per_gpc * std::max(dev.sms / kSmsPerGpc, 1);
  return cudaSuccess;
}
#pragma pop_macro("blockDim")
#pragma pop_macro("gridDim")
