"""Checkpoints that resume exactly, hold only data, and are verified before anything in them is read.

`checkpoint-STEP/` holds Accelerate's model and optimizer state (safetensors and tensor-only torch files; under
DeepSpeed its engine files), and, written by this module as JSON: `trainer_state.json` (step, early stopping),
`scheduler_state.json` (the LR scheduler), `rng_state_RANK.json` (Python, NumPy and torch generators of every
process), `run_config.json` (the resolved config of the run) and `topology.json` (processes, engine, batch; see
dpo/resize.py for a resume on another number of processes). `manifest.json`, written last, lists every file
with its size and sha256. The folder is written under a temporary name (`.tmp-checkpoint-STEP`, known to every
process) and put in place when complete (`dpo.atomic.replace_folder`).

Loading verifies the manifest first (a changed, missing or unlisted file is refused, named), then reads every
torch file with `weights_only=True`, DeepSpeed's included: nothing in a checkpoint can run code. `latest` skips a
corrupt newest checkpoint for the previous complete one, saying so. The data position needs no saving: the order
of every epoch is a function of (seed, epoch), so the step says it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from accelerate.utils import DistributedType

from dpo.atomic import replace_folder
from dpo.distributed import deepspeed_checkpoint_globals
from dpo.errors import UserError
from dpo.fingerprint import file_sha256

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
SCHEDULER_FILE = "scheduler_state.json"
CONFIG_FILE = "run_config.json"
TOPOLOGY_FILE = "topology.json"
MANIFEST_VERSION = 1
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(UserError):
    """A checkpoint that cannot be trusted or read; the message names the file."""


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders (renamed into place, so written to the end unless damaged later), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


# ------------------------------------------------------------------------------------------ verification


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def write_manifest(folder: Path) -> None:
    entries = {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
               for name in _files(folder) if name != MANIFEST_FILE}
    (folder / MANIFEST_FILE).write_text(json.dumps({"version": MANIFEST_VERSION, "files": entries}, indent=1))


def verify_checkpoint(folder: str | Path) -> None:
    """Raise CheckpointError naming the first file that is missing, changed, or not written by the checkpoint."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing, so the checkpoint cannot be verified (incomplete, or "
                              f"written by an older version)")
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = {str(k): v for k, v in manifest["files"].items()}
        sizes_and_digests = {k: (int(v["size"]), str(v["sha256"])) for k, v in listed.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{manifest_path}: corrupted (not a checkpoint manifest)") from None
    for name in _files(folder):
        if name.endswith(".pkl"):  # Accelerate's pickled objects and generators: this module writes none
            raise CheckpointError(f"{folder / name}: a pickle, which checkpoints of this version never hold (added "
                                  f"later, or written by an older version); refused without reading it")
        if name != MANIFEST_FILE and name not in listed:
            raise CheckpointError(f"{folder / name}: not part of the checkpoint (not in {MANIFEST_FILE}); it was "
                                  f"added later and is refused, remove it if it is yours")
    for name, (size, digest) in sizes_and_digests.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{manifest_path}: lists {name!r}, outside the checkpoint folder")
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        if path.stat().st_size != size or file_sha256(path) != digest:
            raise CheckpointError(f"{path}: corrupted (its checksum differs from {MANIFEST_FILE})")


def resolve_resume_path(output_dir: str | Path, resume: str, *, log: Callable[[str], None] = print) -> Path:
    """The verified checkpoint to resume from: a folder, or the newest one that verifies for `latest`."""
    if resume != "latest":
        verify_checkpoint(resume)
        return Path(resume)
    found = list_checkpoints(output_dir)
    if not found:
        raise CheckpointError(f"resume_from_checkpoint latest: {output_dir} holds no checkpoint to resume from "
                              f"(start without --resume_from_checkpoint)")
    for candidate in reversed(found):
        try:
            verify_checkpoint(candidate)
        except CheckpointError as exc:
            log(f"[dpo] warning: skipping {candidate.name}: {exc}")
            continue
        if candidate != found[-1]:
            log(f"[dpo] warning: resuming from {candidate.name}, the newest checkpoint that verifies")
        return candidate
    raise CheckpointError(f"resume_from_checkpoint latest: no checkpoint in {output_dir} verifies (see the "
                          f"warnings above)")


# ------------------------------------------------------------------------------------------ saving

LOW_DISK_BYTES = 64 << 20


@contextlib.contextmanager
def reporting_full_disk(target: Path) -> Iterator[None]:
    """Turn a failed save on a full disk into OSError(ENOSPC) naming `target` (torch's zip writer and safetensors
    report it as RuntimeError or their own error), and remove the partial `target` folder."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            shutil.rmtree(target, ignore_errors=True)
            raise
        existing = next((p for p in (target, *target.parents) if p.exists()), Path("/"))
        if shutil.disk_usage(existing).free >= LOW_DISK_BYTES:
            raise
        shutil.rmtree(target, ignore_errors=True)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from exc


def rng_state() -> dict[str, Any]:
    """This process's generators as JSON-able data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(accelerator: Any, output_dir: str | Path, state: TrainerState, *, scheduler: Any,
                    run_config: dict[str, Any], save_total_limit: int | None,
                    save_extra: Callable[[Path], None] | None = None, topology: dict[str, Any] | None = None
                    ) -> Path:
    """Every process calls this (DeepSpeed saves its shards from each); the main process renames and rotates.

    `save_extra(folder)` (called on every process) adds files to the checkpoint before its manifest is written
    (TR-DPO's synced reference)."""
    root = Path(output_dir)
    final = root / f"checkpoint-{state.step}"
    tmp = root / f".tmp-checkpoint-{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with reporting_full_disk(tmp):
        accelerator.save_state(str(tmp))
        # Accelerate pickles the generators; this process's are kept as JSON instead.
        (tmp / f"random_states_{accelerator.process_index}.pkl").unlink(missing_ok=True)
        (tmp / f"rng_state_{accelerator.process_index}.json").write_text(json.dumps(rng_state()))
        if save_extra is not None:
            save_extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with reporting_full_disk(tmp):
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
            (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict(), indent=2))
            (tmp / CONFIG_FILE).write_text(json.dumps(run_config, indent=2))
            if topology is not None:
                (tmp / TOPOLOGY_FILE).write_text(json.dumps(topology, indent=2))
            write_manifest(tmp)  # last: a checkpoint with a manifest is complete
        replace_folder(tmp, final)  # an older checkpoint of this step goes only once this one is in place
        if save_total_limit:
            for old in list_checkpoints(root)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------ loading


@contextlib.contextmanager
def tensors_only_torch_load(allowed: list[Any]) -> Iterator[None]:
    """Every torch.load inside (Accelerate's, DeepSpeed's) reads tensors, plain containers and the `allowed`
    plain-data classes only."""
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{f}: holds Python objects other than tensors and was not unpickled "
                                  f"({' '.join(str(exc).split()[:12])} ...)") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None


def read_run_config(path: str | Path) -> dict[str, Any] | None:
    """The resolved config stored with a verified checkpoint."""
    config = Path(path) / CONFIG_FILE
    return _read_json(config) if config.is_file() else None


def checkpoint_torch_load(accelerator: Any) -> contextlib.AbstractContextManager[None]:
    """`tensors_only_torch_load` with the plain-data classes this accelerator's engine files need."""
    allowed = []
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        allowed = deepspeed_checkpoint_globals()
    return tensors_only_torch_load(allowed)


def load_checkpoint(accelerator: Any, path: str | Path, *, scheduler: Any, engine_state_dir: Path | None = None,
                    restore_rng: bool = True) -> TrainerState:
    """Model, optimizer, scheduler, generators and trainer state of a checkpoint verified by resolve_resume_path.

    `engine_state_dir`: where the model and optimizer state are read instead (a universal conversion of this
    checkpoint for another number of processes, dpo/resize.py); `restore_rng=False` leaves the generators to the
    caller (after such a resize the processes no longer correspond)."""
    path = Path(path)
    with checkpoint_torch_load(accelerator):
        accelerator.load_state(str(engine_state_dir or path))
    raw = _read_json(path / STATE_FILE)
    known = {f.name for f in fields(TrainerState)}
    if not isinstance(raw, dict) or set(raw) - known:
        raise CheckpointError(f"{path / STATE_FILE}: not a trainer state")
    scheduler_state = _read_json(path / SCHEDULER_FILE)
    if not isinstance(scheduler_state, dict):
        raise CheckpointError(f"{path / SCHEDULER_FILE}: not a scheduler state")
    scheduler.load_state_dict(scheduler_state)
    if not restore_rng:
        return TrainerState(**raw)
    rng_file = path / f"rng_state_{accelerator.process_index}.json"
    if not rng_file.is_file():
        raise CheckpointError(f"{rng_file}: missing (was the checkpoint written by fewer processes?)")
    try:
        set_rng_state(_read_json(rng_file))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{rng_file}: not a generator state ({exc})") from None
    return TrainerState(**raw)
