"""A run's state on disk, written so that an interruption loses at most a few steps.

Layout under a run folder:

    checkpoints/latest.json        {"dir", "stage", "epoch", "step"}; renamed into place last
    checkpoints/s<S>-e<E>-b<B>/    the latest checkpoint and the one before it
        adapter/                   PEFT `save_pretrained` (its r and lora_alpha included)
        state.pt                   optimizer, GradScaler, RNG states, the epoch's running sums
        progress.json              position, history rows so far, metrics so far
        manifest.json              SHA-256 of every file above; written last

Position (stage, epoch, step): the next batch to run is batch `step` (0-based) of `epoch`
(1-based) of `stage`. A checkpoint folder is complete before `latest.json` names it, and
older folders are deleted only after, so `latest.json` always names a whole checkpoint.
Loading checks the manifest; a damaged checkpoint (truncated or flipped file, unreadable
`latest.json`, folder gone) falls back to the previous one with a `CheckpointWarning`.

`<run>/.lock` (host, pid, start, last refresh) exists while a process trains the run
(`run_lock`): a second process gets `RunLocked` instead of writing into the same folder. The
lock is a lease: its holder rewrites it every `LEASE_REFRESH_S` seconds, and a lock written on
another machine that has not been refreshed for `LEASE_STALE_S` seconds is stale (its holder
died with its machine: a Colab runtime that was reset, a preempted node), so the next process
takes it over. On the same machine a lock is held exactly as long as its process lives.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .adapters import full_rank, load_adapter
from .config import ExperimentConfig
from .distributed import broadcast, is_main
from .results import disk_errors, read_json, write_json_atomic

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_NAME = re.compile(r"s(\d+)-e(\d+)-b(\d+)")


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped in favour of an earlier one."""


class RunLocked(OSError):
    """Another process holds the run folder's lock."""


LOCK = ".lock"
LEASE_REFRESH_S = 60.0   # the holder rewrites its lock this often
LEASE_STALE_S = 600.0    # a lock from another machine not refreshed for this long is stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


@contextmanager
def run_lock(run: Path):
    """Hold `<run>/.lock` while the block runs, refreshing it every LEASE_REFRESH_S seconds.
    RunLocked names the holder when another process has it (`_stale` says when a lock no
    longer counts). Created with O_EXCL, so two processes never both get it. Under several
    processes of one run (accelerate), process 0 takes it and all of them learn the outcome."""
    error, lease = None, None
    if is_main():
        try:
            lease = _Lease(run / LOCK, _acquire(run))
        except RunLocked as err:
            error = str(err)
    error = broadcast(error)
    if error:
        raise RunLocked(error)
    try:
        yield
    finally:
        if lease is not None:
            lease.release()


class _Lease(threading.Thread):
    """Rewrites the lock `path` (holder `me`) every LEASE_REFRESH_S seconds until `release`,
    which stops it and deletes the lock, as long as the lock is still this holder's."""

    def __init__(self, path: Path, me: dict):
        super().__init__(daemon=True, name=f"lease {path}")
        self.path, self.me, self.stop = path, me, threading.Event()
        self.start()

    def ours(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("token") == self.me["token"]
        except (OSError, ValueError):
            return False

    def run(self) -> None:
        while not self.stop.wait(LEASE_REFRESH_S):
            if self.ours():
                write_json_atomic(self.path, {**self.me, "refreshed": time.time()})

    def release(self) -> None:
        self.stop.set()
        self.join()
        if self.ours():
            self.path.unlink(missing_ok=True)


def _stale(holder: dict, path: Path, host: str) -> tuple[bool, float]:
    """(whether the lock `holder` read from `path` no longer counts, seconds since its holder
    last refreshed it). Same machine: stale once its process has exited. Another machine:
    stale LEASE_STALE_S seconds after its last refresh (a lock from before leases: its mtime)."""
    refreshed = holder.get("refreshed")
    age = time.time() - (float(refreshed) if isinstance(refreshed, (int, float)) else path.stat().st_mtime)
    if holder.get("host") == host:
        return not _alive(int(holder.get("pid", -1))), age
    return age > LEASE_STALE_S, age


def _acquire(run: Path) -> dict:
    """Create `run/.lock` for this process (taking over a stale one) and return what it holds."""
    run.mkdir(parents=True, exist_ok=True)
    path, host = run / LOCK, socket.gethostname()
    for _ in range(3):
        me = {"host": host, "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "token": uuid.uuid4().hex, "refreshed": time.time()}
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                stale, age = _stale(holder, path, host)
            except (OSError, ValueError, TypeError):  # being written, or removed just now: look again
                time.sleep(0.2)
                continue
            if stale:  # its process is gone, or its machine stopped refreshing it
                path.unlink(missing_ok=True)
                continue
            raise RunLocked(_locked_message(run, path, holder, host, age)) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return me
    raise RunLocked(f"{path}: could not take the lock (it keeps changing); is another process "
                    "starting this run?")


def _locked_message(run: Path, path: Path, holder: dict, host: str, age: float) -> str:
    who = (f"{run} is being run by process {holder.get('pid')} on {holder.get('host')} "
           f"(since {holder.get('since')}); two processes never write one run.")
    if holder.get("host") == host:
        return (f"{who} Wait for it to finish, or stop it (kill {holder.get('pid')}) and start again; if "
                f"that pid is another program now, delete {path} and start again.")
    left = max(LEASE_STALE_S - age, 0.0)
    return (f"{who} Its lock was last refreshed {age / 60:.1f} min ago; if that machine is gone (a "
            f"reset Colab runtime, a killed job), the lock counts as stale in {left / 60:.1f} min and the "
            f"same command then resumes the run. Sure that no process runs it? delete {path} and "
            "start again.")


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished folder `tmp` to `path`, replacing any old `path` (old one removed last)."""
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def write_dir_atomic(path: str | Path, write) -> Path:
    """Call `write(tmp)` on a temporary folder beside `path`, then swap it in for `path`: never a
    half-written folder; on a failure the temporary folder is removed (a full disk gets its space
    back, and raises `results.DiskFull` naming `path`). Under several processes only process 0
    writes."""
    path = Path(path)
    if not is_main():
        return path
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_errors(path):
            write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)
    return path


def save_adapter(model, path: str | Path) -> Path:
    """`model.save_pretrained(path)` through a temporary folder: never a half-written adapter.
    An AdaLoRA adapter is saved at full rank (`adapters.full_rank`)."""
    with full_rank(model):  # AdaLoRA: every component, so training continues from it exactly
        # never resized; the check warns on GGUF bases
        return write_dir_atomic(path, lambda tmp: model.save_pretrained(str(tmp), save_embedding_layers=False))


def copy_dir(src: str | Path, path: str | Path) -> Path:
    """Copy the folder `src` to `path` through a temporary folder (atomic like `save_adapter`)."""
    return write_dir_atomic(path, lambda tmp: shutil.copytree(src, tmp))


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
    if not is_main():  # several processes: process 0 writes (the state is the same on all)
        return root / name

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        with full_rank(model):  # AdaLoRA: every component, so training continues from it exactly
            model.save_pretrained(str(tmp / "adapter"), save_embedding_layers=False)
        torch.save({**state, "rng": rng_state()}, tmp / "state.pt")
        write_json_atomic(tmp / "progress.json", {**progress, "position": list(position)})
        write_json_atomic(tmp / MANIFEST, {str(f.relative_to(tmp)): _sha256(f) for f in sorted(tmp.rglob("*"))
                                           if f.is_file()})

    previous = _pointer(root)
    write_dir_atomic(root / name, write)
    write_json_atomic(root / "latest.json", {"dir": name, "stage": stage, "epoch": epoch, "step": step})
    for other in root.iterdir():  # keep this one and the one before it (a fallback)
        if other.is_dir() and other.name not in (name, previous):
            shutil.rmtree(other, ignore_errors=True)
    return root / name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pointer(root: Path) -> str | None:
    """The folder name in `root/latest.json`, or None when it is missing or unreadable."""
    try:
        return str(read_json(root / "latest.json")["dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def damage(ckpt: Path) -> str | None:
    """What is wrong with the checkpoint folder `ckpt` (missing, unfinished, a file missing or
    changed since it was written), or None when it is whole. Folders written before manifests
    existed are taken as whole."""
    if not ckpt.is_dir():
        return "the folder is gone"
    if not (ckpt / MANIFEST).exists():
        return None if (ckpt / "state.pt").exists() else "unfinished (no manifest.json)"
    try:
        manifest = read_json(ckpt / MANIFEST)
    except (OSError, ValueError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for rel, digest in manifest.items():
        if not (ckpt / rel).is_file():
            return f"{rel} is missing"
        if _sha256(ckpt / rel) != digest:
            return f"{rel} does not match its checksum (truncated or altered)"
    return None


def candidates(run: str | Path) -> list[Path]:
    """A run's checkpoint folders, best first: the one `latest.json` names (or, if that
    position was being re-saved when cut short, its `.old` copy), then the others, latest
    position first."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = sorted((d for d in root.iterdir() if d.is_dir() and _NAME.fullmatch(d.name)),
                   key=lambda d: tuple(int(x) for x in _NAME.fullmatch(d.name).groups()), reverse=True)
    name = _pointer(root)
    if name is None:
        return found
    first = root / name
    old = root / f".{name}.old"  # the same position re-saved and cut short mid-rename
    first = first if first.exists() or not old.exists() else old
    return [first] + [d for d in found if d != first]


def checkpoint_position(run: str | Path) -> tuple[int, int, int] | None:
    """(stage, epoch, step) that `latest.json` names, or None (no checkpoint, or unreadable)."""
    try:
        saved = read_json(Path(run) / CHECKPOINTS / "latest.json")
        return int(saved["stage"]), int(saved["epoch"]), int(saved["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_checkpoint(run: str | Path, cfg: ExperimentConfig, device: torch.device):
    """(trainable model, state, progress) of the latest whole checkpoint, or None when the run
    has none. A damaged latest checkpoint falls back to the one before it (`CheckpointWarning`);
    ValueError naming what is wrong when no checkpoint can be used.

    The RNG states are in `state["rng"]`; the caller restores them (`set_rng_state`) at the
    point of the loop where they were saved, after any other set-up work.
    """
    root, problems = Path(run) / CHECKPOINTS, []
    if (root / "latest.json").exists() and _pointer(root) is None:
        problems.append(f"{root / 'latest.json'} is unreadable")
    for ckpt in candidates(run):
        why = damage(ckpt)
        if why is None:
            try:
                model = load_adapter(cfg, ckpt / "adapter", device, trainable=True)
                state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
                progress = read_json(ckpt / "progress.json")
            except Exception as err:  # noqa: BLE001 - any unreadable file: try the previous one
                why = f"cannot be loaded ({type(err).__name__}: {err})"
        if why is not None:
            problems.append(f"{ckpt}: {why}")
            continue
        if problems:
            warnings.warn(f"{'; '.join(problems)}. Resuming from {ckpt} instead.",
                          CheckpointWarning, stacklevel=2)
        return model, state, progress
    if problems:
        raise ValueError(f"no usable checkpoint in {root} ({'; '.join(problems)}). "
                         f"Delete {Path(run)} to start the run over.")
    return None


def clear_checkpoints(run: str | Path) -> None:
    """Delete a run's checkpoints (after it has completed)."""
    if is_main():
        shutil.rmtree(Path(run) / CHECKPOINTS, ignore_errors=True)
