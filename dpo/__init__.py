"""The DPO training pipeline's library: config, data, layouts, models, reference, log-probs, losses, the training
loop (`python -m dpo.train`) and its outputs. Data preparation is the sibling package `data_prep`."""

import logging


class _OptionalHubKernelNotice(logging.Filter):
    """bitsandbytes (the `qlora` extra) tries, when imported on a CPU with AVX512-BF16, to fetch an optional 4-bit
    matmul kernel from the Hugging Face Hub, and logs a warning when it cannot; transformers and peft import it
    whenever it is installed, so every run would start with that line, QLoRA or not. It is harmless: bitsandbytes
    then uses its built-in kernel (and no code is fetched or run from the Hub). Other messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in str(record.msg)


# Installed before anything imports bitsandbytes: every entry point imports this package first.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalHubKernelNotice())
