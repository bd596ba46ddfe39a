"""The demo: the whole pipeline on a tiny model, on a CPU - not part of the installed package.

    ./launch.sh demo [--output_dir runs/demo] [--quick] [--seed 0]      (or python -m demo, from the repo root)

run.py        the six stages: synthetic data, tokenizer and model, data prep, warm-up, DPO, held-out evaluation
synthetic.py  the synthetic "first or last word" preference dataset (python -m demo.synthetic)
tiny.py       a byte-level BPE tokenizer and a small Llama-style model built locally; the demo's workload, which the
              benchmarks and the tests build their models and tokenizers with too
"""
