"""Every benchmark of the project - not part of the installed package. Run each from the repo root, as a module:

    ./launch.sh bench [--vs-trl] [...]           python -m benchmarks.bench_throughput: layouts x reference strategies
    python -m benchmarks.bench_reference [...]   reference strategies x full/LoRA on a model of any size (GPU-sized)
    python -m benchmarks.bench_prep [...]        data-prep pairs/s per core
    python -m benchmarks.bench_probe [...]       one-time cost of the layout probe
    python -m benchmarks.bench_eval [...]        evaluation cost per pair against a training step's forward
    python -m benchmarks.bench_demo [...]        ./launch.sh demo end to end
    python -m benchmarks.bench_memory [...]      peak memory at a real vocabulary, against TRL
    python -m benchmarks.bench_masks [...]       attention-mask bytes per row: dense against FlexAttention block masks
    python -m benchmarks.bench_long [...]        long pairs on a GPU: the default (FlexAttention) against padded sdpa
    python -m benchmarks.check_flex_gpu [...]    FlexAttention's compiled GPU kernels, forward and backward, checked

measure.py holds what several of them measure with: peak memory, matmul ceilings, the hardware record; pieces.py
the trainer's own pieces (prepared models, one update) as they drive them.
"""
