"""dpo.train with a signal sent to its own process at a chosen point, for tests/test_preemption.py.

    DPO_TEST_SIGNAL_STEP=3:SIGUSR1:1 python tests/signal_driver.py --model_path M ...   # rank 1, during step 3
    DPO_TEST_SIGNAL_SAVE=4:SIGTERM python tests/signal_driver.py ...   # main process, writing checkpoint-4

Only the moment is staged: the signal is a real one (os.kill), and what follows is dpo.train's own handling (the
handler, the flag reduced across processes, the checkpoint, exit 75), or the default action (death) when
save_on_signal is none. Works under `accelerate launch` (RANK picks the process).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dpo.checkpoint as ckpt  # noqa: E402
import dpo.train as train_module  # noqa: E402


def _spec(name: str) -> list[str] | None:
    value = os.environ.get(name)
    return value.split(":") if value else None


def _send(signal_name: str) -> None:
    os.kill(os.getpid(), getattr(signal, signal_name))


def main() -> int:
    at_step, in_save = _spec("DPO_TEST_SIGNAL_STEP"), _spec("DPO_TEST_SIGNAL_SAVE")
    if at_step:
        original_step = train_module.optimizer_step

        def optimizer_step(*args: Any, step: int, **kwargs: Any) -> Any:
            if step == int(at_step[0]) and os.environ.get("RANK", "0") in at_step[2].split(","):
                _send(at_step[1])  # the step is in flight: its gradients are in, the update is not made yet
            return original_step(*args, step=step, **kwargs)

        train_module.optimizer_step = optimizer_step
    if in_save:
        original_manifest = ckpt.write_manifest

        def write_manifest(folder: Path) -> None:
            if folder.name == f".tmp-checkpoint-{in_save[0]}":
                _send(in_save[1])  # every shard is written, the manifest that completes the checkpoint is not
            original_manifest(folder)

        ckpt.write_manifest = write_manifest
    return train_module.main()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
