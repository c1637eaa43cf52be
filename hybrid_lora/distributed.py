"""Data parallelism over the processes of `accelerate launch` (or `torchrun`): one run, every
global batch split across processes, gradients summed, evaluations gathered.

The process group is the launcher's (RANK / WORLD_SIZE in the environment); `setup` joins it
through accelerate's `PartialState` (NCCL on CUDA, gloo on CPU). Without a launcher every
function here is the identity and a run is exactly the single-process run. Conventions:
- a global batch of `batch_size` rows is cut into `world` contiguous shards (`shard`); each
  process divides its CE sum by the tokens of the whole batch, so the summed gradients
  (`all_reduce_grads`) are those of the whole batch; regularizers, identical on every process,
  are added with weight 1/world;
- only the process with RANK 0 writes files (`is_main`); the others wait (`barrier`) where
  they read what it wrote;
- every process has its own dropout stream (`process_seed`); choices that must agree
  (DyLoRA's rank b) are taken from process 0 (`broadcast`).
"""
from __future__ import annotations

import os


def world() -> tuple[int, int]:
    """(rank, number of processes) of this process; (0, 1) without a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files: RANK 0, or no launcher (no torch needed)."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device):
    """Join the launcher's process group when WORLD_SIZE > 1 and return this process's device
    (cuda:LOCAL_RANK on GPUs); `device` unchanged in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", state.local_process_index)
        torch.cuda.set_device(device)
    return device


def process_seed(seed: int) -> int:
    """The seed this process draws dropout from: `seed` on process 0 (a 1-process run's
    stream), a different stream on each other process."""
    rank, _ = world()
    return seed if rank == 0 else (seed * 1_000_003 + rank) % 2**63


def shard(t):
    """This process's contiguous block of the rows of tensor `t` (possibly empty)."""
    import torch

    rank, size = world()
    return t if size == 1 else torch.tensor_split(t, size)[rank]


def all_reduce_grads(params) -> None:
    """Sum the gradients of `params` over processes, in one collective (None counts as zeros)."""
    rank, size = world()
    if size == 1:
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, part in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = part.view_as(p)


def all_reduce(t, op: str = "sum"):
    """Tensor `t` reduced over processes ("sum" or "max"; a new tensor)."""
    _, size = world()
    if size == 1:
        return t
    import torch.distributed as dist

    out = t.clone()
    dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return out


def broadcast(value):
    """Process 0's `value` (any picklable object) on every process."""
    _, size = world()
    if size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """[obj of process 0, obj of process 1, ...] on every process."""
    _, size = world()
    if size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every process (a no-op in one process)."""
    _, size = world()
    if size > 1:
        import torch.distributed as dist
        dist.barrier()
