// Shapes that Qwen3 fixes for every model size, compiled in as constants.
//
// Everything else (hidden size, head counts, token counts, strides) stays a
// runtime argument: one kernel instance per dtype serves every model.
#pragma once

namespace qwen3x {

// Per-head width of q, k and v in every Qwen3 / Qwen3-MoE checkpoint.
constexpr int kHeadDim = 128;
// RoPE rotates the two halves of a head against each other (NeoX rotate_half).
constexpr int kRotaryHalf = kHeadDim / 2;

}  // namespace qwen3x
