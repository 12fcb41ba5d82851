"""One-off GPU probes: not shipped (not in pyproject's packages), run from the repository root.

    python -m experiments.gpu_decode_profile     where a decode step's GPU time goes: the decode
                                                 graphs' kernels by kind, the GPU's idle time
                                                 between steps, the host's time per step
    python -m experiments.gpu_gemv               one-row GEMV kernels against cuBLAS at batch 1
                                                 (--sweep: how baton_kernels.gemv's launch
                                                 configurations were chosen; --batches: cuBLAS's
                                                 weight layouts and libraries at M rows)
    python -m experiments.gpu_decode_attention   the paged decode attention kernel alone, over
                                                 batch sizes, contexts, split counts, block layouts
    python -m experiments.gpu_splitk             a split-K Triton GEMM against cuBLAS at decode
                                                 row counts (why the engine keeps cuBLAS there)

Each needs a CUDA GPU and writes a JSON result (default under bench/results/); only results that
docs/performance.md cites are committed, and bench/results/README.md indexes them. The
benchmarks a user runs live in `bench` (`baton bench`, `python -m bench.X`).
"""
