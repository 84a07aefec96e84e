// Sizes the MoE routing kernels are built for. Host-safe (no CUDA headers):
// the torch glue checks arguments against them, the kernels size shared
// memory and register arrays with them.
#pragma once

namespace qwen3x::moe {

// Most experts a router / permute launch supports (Qwen3-MoE has 128). Per
// token the router keeps kMaxExperts / 32 logits per lane in registers, and
// both kernels keep a kMaxExperts-entry histogram in shared memory.
constexpr int kMaxExperts = 512;
// Most experts per token (Qwen3-MoE picks 8); one lane of a warp holds each pick.
constexpr int kMaxTopK = 16;

// Expert index of a pick the permute kernels ignore (an id outside [0, E)).
constexpr int kNoExpert = -1;
// What sorted_rows holds in padding slots and inverse for ignored picks.
constexpr int kEmptySlot = -1;

}  // namespace qwen3x::moe
