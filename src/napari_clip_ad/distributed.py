"""torchrun support shared by training and cohort inference: rank, world size, a rank's GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """Rank and world size (1 process unless started by torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """True for rank 0 (the one that writes shared files)."""
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place by summing over the ranks (no-op alone)."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        """Wait until every rank gets here (no-op alone)."""
        if self.world > 1:
            dist.barrier()


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL for CUDA, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def rank_device(device: torch.device, ranks: Dist) -> torch.device:
    """Under torchrun on CUDA each rank takes its own GPU (``LOCAL_RANK``); otherwise ``device`` unchanged."""
    if device.type != "cuda" or ranks.world <= 1:
        return device
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", ranks.rank)) % torch.cuda.device_count())
    torch.cuda.set_device(local)
    return local
