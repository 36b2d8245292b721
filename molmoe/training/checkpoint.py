"""Training checkpoints: torch.distributed.checkpoint (DCP), committed atomically, resumed exactly.

Layout under the run's output directory:

    checkpoints/step-00000300/    a complete checkpoint (the newest complete one is resumed)
        .metadata, __0_0.distcp, __1_0.distcp, ...   DCP: the model and optimizer state, each
                                                      rank writing its own shards
        rng-rank00000.pt, ...     each rank's RNG states (torch, CUDA, Python, NumPy)
        trainer.json              the step and the run's settings; written LAST
    checkpoints/.tmp-step-00000400/   a checkpoint being written (or left by a killed run)

Atomicity. Every rank writes into `.tmp-step-N`; after a barrier, rank 0 writes `trainer.json`,
fsyncs every file and the directory, and renames it to `step-N`. The rename is the commit: a run
killed at any instant before it (SIGKILL included) leaves only a `.tmp-` directory, which is never
read and is removed by the next run, so the previous checkpoint stays the one resumed. A
checkpoint directory counts as complete only when it is named `step-N` and holds `trainer.json`.
The filesystem must be shared by all ranks (one machine, or a shared mount).

Exactness. The model and optimizer state round-trip through DCP bit for bit (fp32 master weights,
AdamW's moments and step counts); the learning rate is a pure function of the step
(`molmoe.training.trainer.learning_rate`), and the data order is a pure function of (seed, step)
(`BucketSampler`), so a resumed run takes the same steps as one never stopped. DCP reshards on
load, so a run may resume on a different number of ranks (then only the RNG files of ranks that
existed are restored; the training step itself draws no random numbers).
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)

from molmoe.errors import MolmoeError
from molmoe.fileio import fsync_dir, fsync_file

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer.json"
_NAME = re.compile(r"step-(\d{8,})")


class CheckpointResumeError(MolmoeError):
    """A run's checkpoint cannot be resumed (written by a different run, or unreadable)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(out: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """(step, directory) of every complete checkpoint under `out`, oldest first."""
    root = pathlib.Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _NAME.fullmatch(d.name)
        if m and d.is_dir() and not d.is_symlink() and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def remove_partial(out: pathlib.Path) -> list[pathlib.Path]:
    """Remove `.tmp-step-*` directories (checkpoints a killed run was writing); rank 0 only."""
    root = pathlib.Path(out) / CHECKPOINTS
    removed = []
    if _rank() == 0 and root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(".tmp-step-") and d.is_dir() and not d.is_symlink():
                shutil.rmtree(d)
                removed.append(d)
    _barrier()
    return removed


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out: pathlib.Path, step: int, model, optimizer, meta: dict, *, keep: int = 2
         ) -> pathlib.Path:
    """Write the checkpoint of `step` (all ranks call this); returns its directory. Keeps the
    newest `keep` complete checkpoints (>= 1), deleting older ones only after the commit."""
    root = pathlib.Path(out) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    _barrier()
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(tmp))
    rng = tmp / f"rng-rank{rank:05d}.pt"
    torch.save(_rng_state(), rng)
    fsync_file(rng)
    _barrier()
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **meta}, indent=2))
        for f in tmp.iterdir():
            fsync_file(f)
        fsync_dir(tmp)
        if final.exists():  # a complete checkpoint of this step from an earlier attempt
            shutil.rmtree(final)
        os.rename(tmp, final)  # the commit
        fsync_dir(root)
        for _, old in complete_checkpoints(out)[:-max(1, keep)]:
            shutil.rmtree(old)
    _barrier()
    return final


def read_meta(directory: pathlib.Path) -> dict:
    try:
        meta = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointResumeError(f"{directory / STATE_FILE}: unreadable ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointResumeError(f"{directory / STATE_FILE}: not a molmoe trainer state")
    return meta


def load(directory: pathlib.Path, model, optimizer) -> dict:
    """Load the checkpoint in `directory` into `model` and `optimizer` (all ranks), restore this
    rank's RNG states, and return its trainer.json."""
    meta = read_meta(directory)
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rng = directory / f"rng-rank{_rank():05d}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return meta
