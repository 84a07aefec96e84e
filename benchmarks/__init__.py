"""qwen3x microbenchmarks: ``python -m benchmarks --help``.

Layout (one concern per module):

- ``harness.py``   Case / Provider, the correctness check, the run loop of one case
- ``timing.py``    CUDA-event timer (warm-up, cold L2, optional CUDA graphs), percentiles
- ``ceilings.py``  measured device ceilings (copy bandwidth, bf16 matmul FLOP/s)
- ``rows.py``      result rows (JSON lines), environment metadata, the printed table
- ``providers.py`` the providers shared by several suites (qwen3x, reference, torch_compile, liger)
- ``shapes.py``    Qwen3 model dimensions (DESIGN.md section 3)
- ``suites/``      one module per op family, FLOP and byte formulas next to each benchmark
- ``model.py``     whole-model prefill / decode benchmark
- ``precompile.py`` the torch.compile'd providers compiled first in parallel worker processes
- ``plot.py``      PNGs from rows; ``run.py`` the command line

Nothing here is imported by the ``qwen3x`` package.
"""
