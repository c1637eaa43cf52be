"""A run's state on disk, written so that an interruption loses at most a few steps.

Layout under a run folder:

    checkpoints/latest.json        {"dir", "stage", "epoch", "step"}; renamed into place last
    checkpoints/s<S>-e<E>-b<B>/
        adapter/                   PEFT `save_pretrained` (its r and lora_alpha included)
        state.pt                   optimizer, GradScaler, RNG states, the epoch's running sums
        progress.json              position, history rows so far, metrics so far

Position (stage, epoch, step): the next batch to run is batch `step` (0-based) of `epoch`
(1-based) of `stage`. A checkpoint folder is complete before `latest.json` names it, and
older folders are deleted only after, so `latest.json` always names a whole checkpoint.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .adapters import load_adapter
from .config import ExperimentConfig
from .results import read_json, write_json_atomic

CHECKPOINTS = "checkpoints"


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished folder `tmp` to `path`, replacing any old `path` (old one removed last)."""
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def save_adapter(model, path: str | Path) -> Path:
    """`model.save_pretrained(path)` through a temporary folder: never a half-written adapter."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    replace_dir(tmp, path)
    return path


def copy_dir(src: str | Path, path: str | Path) -> Path:
    """Copy the folder `src` to `path` through a temporary folder (atomic like `save_adapter`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    replace_dir(tmp, path)
    return path


def rng_state() -> dict:
    """Python, NumPy, torch CPU and (if present) every CUDA device's RNG state."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Inverse of `rng_state`."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: str | Path, model, position: tuple[int, int, int], state: dict,
                    progress: dict) -> Path:
    """Write one checkpoint at `position`, point `latest.json` at it, delete the older ones.

    `state`: tensors and plain values (optimizer / scaler state dicts, running sums), saved
    with `torch.save`; the RNG states are added here. `progress`: JSON-ready dict.
    """
    root = Path(run) / CHECKPOINTS
    stage, epoch, step = position
    name = f"s{stage}-e{epoch}-b{step}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp / "adapter"))
    torch.save({**state, "rng": rng_state()}, tmp / "state.pt")
    write_json_atomic(tmp / "progress.json", {**progress, "position": list(position)})
    replace_dir(tmp, root / name)
    write_json_atomic(root / "latest.json", {"dir": name, "stage": stage, "epoch": epoch, "step": step})
    for other in root.iterdir():
        if other.is_dir() and other.name != name:
            shutil.rmtree(other, ignore_errors=True)
    return root / name


def latest_checkpoint(run: str | Path) -> Path | None:
    """The folder `latest.json` names, or None when the run has no checkpoint."""
    pointer = Path(run) / CHECKPOINTS / "latest.json"
    if not pointer.exists():
        return None
    name = read_json(pointer)["dir"]
    ckpt = pointer.parent / name
    old = pointer.parent / f".{name}.old"  # the same position re-saved and cut short mid-rename
    return ckpt if ckpt.exists() or not old.exists() else old


def checkpoint_position(run: str | Path) -> tuple[int, int, int] | None:
    """(stage, epoch, step) of the latest checkpoint, or None."""
    pointer = Path(run) / CHECKPOINTS / "latest.json"
    if not pointer.exists():
        return None
    saved = read_json(pointer)
    return saved["stage"], saved["epoch"], saved["step"]


def load_checkpoint(run: str | Path, cfg: ExperimentConfig, device: torch.device):
    """(trainable model, state, progress) of the latest checkpoint, or None.

    The RNG states are in `state["rng"]`; the caller restores them (`set_rng_state`) at the
    point of the loop where they were saved, after any other set-up work.
    """
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        return None
    model = load_adapter(cfg, ckpt / "adapter", device, trainable=True)
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    return model, state, read_json(ckpt / "progress.json")


def clear_checkpoints(run: str | Path) -> None:
    """Delete a run's checkpoints (after it has completed)."""
    shutil.rmtree(Path(run) / CHECKPOINTS, ignore_errors=True)
