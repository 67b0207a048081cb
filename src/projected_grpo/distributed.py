"""Data parallelism on torch.distributed, for `torchrun --nproc_per_node=N -m projected_grpo.train ...`.

Every rank holds the whole model and the same knobs. A step's prompt groups are split
between the ranks; each samples, grades and scores its own share, and the per-layer knob
gradients (and the few sums a metrics row needs) are summed across ranks in one all-reduce
of a flat buffer, so every rank projects the same global gradient and takes the same step.
V is made once on rank 0 and broadcast; rank 0 alone writes. Run as a single process
(no torchrun), `World()` is one rank and every function here returns its input.

Module order: above train, below nothing of the method (it moves tensors and objects only).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import Config, ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_size: int = 1  # ranks on this machine: they share its cores and its grading workers

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0


SINGLE = World()  # one process, no torchrun


def launched() -> bool:
    """Started by torchrun (or anything else that sets the env:// variables)?"""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(cfg: Config) -> World:
    """Join the process group torchrun set up: NCCL on CUDA, Gloo on CPU. Each rank uses the GPU of
    its LOCAL_RANK (cfg.device "cuda" becomes "cuda:<local rank>"). Returns World() when not launched."""
    if not launched():
        return SINGLE
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                  int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
    if world.size > 1 and cfg.device.startswith("cuda:"):
        raise ConfigError(f"--device={cfg.device}: under torchrun each rank takes the GPU of its LOCAL_RANK; "
                          f"pass --device=cuda (CUDA_VISIBLE_DEVICES picks the GPUs)")
    if cfg.prompts_per_step % world.size:
        raise ConfigError(f"--prompts_per_step={cfg.prompts_per_step} does not divide by the {world.size} ranks "
                          f"torchrun started: each rank takes whole prompt groups")
    if not dist.is_initialized():
        cuda = cfg.device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # Gloo beside NCCL: the one-float flags and gathered objects may be CPU tensors. A rank that
        # waits on one still evaluating, refreshing or extracting V waits minutes, not forever.
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    return world


def device_for(cfg: Config, world: World) -> str:
    """This rank's device: under torchrun "cuda" means the GPU of this rank's LOCAL_RANK."""
    if world.size > 1 and cfg.device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    return cfg.device


def share(world: World, items: list) -> list:
    """This rank's contiguous share of a step's prompt groups (their count divides by the world size)."""
    per = len(items) // world.size
    return items[world.rank * per:(world.rank + 1) * per]


def available_cores() -> int:
    # sched_getaffinity honours a taskset or container limit; macOS has no such call.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def grade_workers(cfg: Config, world: World) -> int | None:
    """Sandbox workers for this process: as configured, or (torchrun) this rank's share of the
    machine's cores, so the ranks' graders do not oversubscribe them; None: one per core."""
    if cfg.grade_workers or world.local_size == 1:
        return cfg.grade_workers or None
    return max(1, available_cores() // world.local_size)


def all_sum(world: World, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor summed over the ranks, by one all-reduce of one flat fp32 buffer on the first
    tensor's device (knobs are small: r floats per layer), returned in the tensors' own shapes,
    dtypes and devices."""
    if world.size == 1:
        return tensors
    device = tensors[0].device
    flat = torch.cat([t.detach().to(device=device, dtype=torch.float32).flatten() for t in tensors])
    dist.all_reduce(flat)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view(t.shape).to(device=t.device, dtype=t.dtype))
        start += t.numel()
    return out


def all_gather(world: World, obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def from_main(world: World, make):
    """make() on rank 0, its result sent to every rank (tensors travel on the CPU)."""
    if world.size == 1:
        return make()
    box = [make() if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first(world: World):
    """Rank 0 runs the block first (it builds a cache), the others after it (they find it built)."""
    if not world.main:
        barrier(world)
    yield
    if world.main:
        barrier(world)


def check_identical(world: World, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise unless every rank holds bit-identical `tensors` (a digest of their bytes is compared)."""
    if world.size == 1:
        return
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())  # bf16 exactly
    digests = all_gather(world, digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"{what} differs between ranks (digests {digests}): the ranks would take different steps")


def close(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
