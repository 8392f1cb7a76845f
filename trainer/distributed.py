"""Data-parallel PPO: one process per rank, launched by `torchrun`, the PPO math unchanged.

Each rank samples answers for its share of a step's prompts, scores them and takes its own
advantages. The policy and critic train inside one DistributedDataParallel wrapper, so each
optimizer step applies the gradient averaged over every rank's minibatch: the ranks start from
rank 0's weights and stay identical. Two things cross ranks besides gradients: the KL that
steers the adaptive coefficient (so β is the same everywhere) and, for logging, the step's
statistics. Advantages are whitened per rank, over that rank's answers.

Without torchrun (no WORLD_SIZE > 1 in the environment) there is one rank, no process group,
and every helper here is the identity: single-process training is unchanged.
"""

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

Item = TypeVar("Item")
Stats = TypeVar("Stats")

SUMMED_STATS = frozenset({"tokens_per_second"})
"""Step statistics added up over ranks (throughput); the slowest rank's `seconds` is kept; the rest are averaged."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel ranks: rank `rank` of `world_size`, computing on `device`."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[Item]) -> list[Item]:
        """This rank's share of a step's prompts: every `world_size`-th one from position `rank`.

        Every rank must get as many as the others (each takes the same number of optimizer
        steps, and a DDP backward waits for all ranks), so `len(items)` must divide evenly.
        """
        if len(items) % self.world_size:
            raise ValueError(
                f"{len(items)} prompts cannot be split evenly over {self.world_size} ranks; "
                f"make ppo.prompts_per_step a multiple of the number of ranks"
            )
        return list(items[self.rank :: self.world_size])

    def share(self, total: int, what: str) -> int:
        """`total` split evenly over the ranks, e.g. the answers of one minibatch; ValueError when it does not divide."""
        if total % self.world_size:
            raise ValueError(
                f"{what}={total} cannot be split evenly over {self.world_size} ranks; use a multiple of {self.world_size}"
            )
        return total // self.world_size

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` in DistributedDataParallel when there are several ranks; `module` itself otherwise.

        Gradients are averaged over ranks only for backward passes through the wrapper's forward,
        so every pass that is trained must go through what this returns. The wrapper broadcasts
        rank 0's weights at once, so ranks start identical even if their own loads differed.
        """
        if not self.distributed:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Transformers keep no running statistics: their buffers (rotary frequencies) are constants.
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)

    def mean(self, value: float) -> float:
        """The mean of `value` over all ranks (every rank gets the same result)."""
        if not self.distributed:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item() / self.world_size

    def reduce_stats(self, stats: Stats) -> Stats:
        """A dataclass of float statistics (e.g. PPOStepStats) over all ranks, for logging.

        Throughput (SUMMED_STATS) is added up, `seconds` is the slowest rank's, the rest averaged.
        """
        if not self.distributed:
            return stats
        names = [field.name for field in dataclasses.fields(stats)]
        values = torch.tensor([float(getattr(stats, name)) for name in names], dtype=torch.float64, device=self.device)
        slowest = values.clone()
        dist.all_reduce(values)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        reduced = {}
        for i, name in enumerate(names):
            if name == "seconds":
                reduced[name] = slowest[i].item()
            else:
                reduced[name] = values[i].item() / (1 if name in SUMMED_STATS else self.world_size)
        return dataclasses.replace(stats, **reduced)


SINGLE_PROCESS = Ranks()


def init_ranks(device_type: str = "cpu") -> Ranks:
    """Join the process group `torchrun` describes in the environment; one rank without torchrun.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. With device_type
    "cuda" each rank uses GPU LOCAL_RANK and the NCCL backend; with "cpu", gloo. Call once per
    process, before building models; `close_ranks` at the end.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE_PROCESS
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device_type == "cpu":
        device, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"device_type {device_type!r}: use 'cpu' (gloo) or 'cuda' (NCCL)")
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def close_ranks(ranks: Ranks) -> None:
    """Leave the process group (nothing to do for a single process)."""
    if ranks.distributed:
        dist.destroy_process_group()
