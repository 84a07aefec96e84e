"""Thread-level numpy models of the CUDA kernels in csrc/, for checking them on a machine without a GPU.

Each model re-states a kernel lane by lane (or thread by thread), in the kernel's own order and
with its own index arithmetic: the cp.async copies and their swizzled shared-memory addresses,
the ldmatrix / mma.m16n8k16 fragment layouts, the warp shuffles and reductions, the barriers and
cp.async commit / wait groups, and the glue (.cu) that picks strides, grids and workspaces. The
memories the models use (primitives.GBuf, primitives.Smem) check what the hardware would not:
out-of-bounds addresses, reads of never-written or out-of-tensor memory, shared-memory hazards
(reading cp.async data before its wait and barrier, overwriting data another warp may still
read), and elements written other than exactly once; on request they also count the
shared-memory wavefronts of every access (bank conflicts: a performance check, not a correctness
one). tests/test_kernel_models.py runs the models against python/qwen3x/reference.py.

Modules, each naming the csrc/ file and functions it mirrors:
  primitives  checked global / shared memory, cp.async groups, ldmatrix, mma, shuffles, rounding
  fp          fp32 fma / rsqrtf / expf and core/trig.cuh sincos_accurate
  glue        torch tensors as checked buffers (views, strides, alignment) for element-wise kernels
  attention   attention/*: forward kernel, split-KV combine, attention.cu
  moe         moe/permute.cuh, tile_scheduler.cuh, grouped_gemm.cuh, gemm_epilogue.cuh,
              combine.cuh, moe.cu's experts pipeline
  router      moe/router.cuh (and PyTorch's CUDA softmax it matches)
  rope        rope/qk_norm_rope.cuh, rope.cu
  norm        norm/rms_norm.cuh, norm.cu
  silu        activation/silu_and_mul.cuh, activation.cu

A model is only as good as its faithfulness: when a kernel (or its glue) changes, change its model
in the same commit, with comments pointing at the mirrored source (file: function). The models
complement the GPU tests (tests/test_*_gpu.py), never replace them: they cannot see compiler or
hardware behaviour (register spills, real race timing, the GPU's own rsqrtf / expf), only what
the source says.
"""
