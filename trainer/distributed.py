"""Data-parallel PPO: one process per rank, launched by `torchrun`, the PPO math unchanged.

Each rank samples answers for its share of a step's prompts, scores them and takes its own
advantages. The policy and critic train inside one DistributedDataParallel wrapper, so each
optimizer step applies the gradient averaged over every rank's minibatch: the ranks start from
rank 0's weights and stay identical. Two things cross ranks besides gradients: the KL that
steers the adaptive coefficient (so β is the same everywhere) and, for logging, the step's
statistics. Advantages are whitened per rank, over that rank's answers.

With `parallelism="fsdp"` the models are sharded instead (torch FSDP2, `fully_shard`): every
decoder layer is its own unit, the rest of each model one more; parameters, gradients and AdamW
moments are split over the ranks, gathered one layer at a time for each pass. Everything that
runs a sharded model must then run on every rank, the same number of times: see `FSDP_METHODS`.

Without torchrun (no WORLD_SIZE > 1 in the environment) there is one rank, no process group,
and every helper here is the identity: single-process training is unchanged.
"""

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel

Item = TypeVar("Item")
Stats = TypeVar("Stats")

SUMMED_STATS = frozenset({"tokens_per_second"})
"""Step statistics added up over ranks (throughput); the slowest rank's `seconds` is kept; the rest are averaged."""

Parallelism = Literal["ddp", "fsdp"]

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Whole tensors, on the CPU, on rank 0 only (the others get an empty dict): what files are written from."""
FULL_STATE_EVERY_RANK = StateDictOptions(full_state_dict=True)
"""Whole tensors on every rank, on the device they train on: what each rank's rollout engine loads."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel ranks: rank `rank` of `world_size`, computing on `device`."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    parallelism: Parallelism = "ddp"
    """ddp: every rank holds whole models; fsdp: the models are sharded over the ranks."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Whether models are split over ranks (FSDP): every pass through them is then collective."""
        return self.distributed and self.parallelism == "fsdp"

    @property
    def leads(self) -> bool:
        """Rank 0: the one that reads Kafka, owns the join store and writes checkpoints and the registry."""
        return self.rank == 0

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

    def wrap(self, module: nn.Module, forward_methods: Sequence[str] = ()) -> nn.Module:
        """`module` ready to train on every rank: in DistributedDataParallel, or sharded in place
        (FSDP, see `shard_model`), or itself in one process.

        Gradients are averaged over ranks only for backward passes through the wrapper's forward,
        so every pass that is trained must go through what this returns. DDP broadcasts rank 0's
        weights at once, so ranks start identical even if their own loads differed; FSDP keeps each
        rank's slice of its own load, so every rank must load the same weights (same seed).
        `forward_methods`: methods besides `forward` that run the sharded model (FSDP only).
        """
        if not self.distributed:
            return module
        if self.sharded:
            return self.shard_model(module, forward_methods)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Transformers keep no running statistics: their buffers (rotary frequencies) are constants.
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)

    def shard_model(self, module: nn.Module, forward_methods: Sequence[str] = ()) -> nn.Module:
        """Shard `module` in place with FSDP2 when `parallelism` is fsdp; `module` itself otherwise.

        Each transformer layer (the classes a Hugging Face model lists in `_no_split_modules`)
        becomes one unit, gathered just for its own pass; the rest of `module` is the root unit,
        gathered around `forward` and each of `forward_methods`. Code must not reach into a
        sharded model past those methods: its parameters are slices there.
        """
        if not self.sharded:
            return module
        layer_classes = {
            name
            for submodule in module.modules()
            if isinstance(submodule, PreTrainedModel)
            for name in submodule._no_split_modules or ()
        }
        for submodule in module.modules():
            if type(submodule).__name__ in layer_classes:
                fully_shard(submodule)
        fully_shard(module)
        for method in forward_methods:
            register_fsdp_forward_method(module, method)
        return module

    def full_state_dict(self, module: nn.Module, every_rank: bool = False) -> dict[str, torch.Tensor]:
        """`module`'s weights, whole, to write to files. Sharded: a collective every rank must call,
        and only rank 0 gets them (the others get {}) unless `every_rank`. Otherwise its own state dict."""
        if not self.sharded:
            return module.state_dict()
        return get_model_state_dict(module, options=FULL_STATE_EVERY_RANK if every_rank else FULL_STATE)

    def load_full_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load whole weights (every rank passes the same) into `module`, sharded or not."""
        if not self.sharded:
            module.load_state_dict(state)
            return
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))

    def optimizer_state_dict(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's moments to write to a file: whole on rank 0 when sharded (a collective), else its own."""
        if not self.sharded:
            return optimizer.state_dict()
        return get_optimizer_state_dict(module, optimizer, options=FULL_STATE)

    def load_optimizer_state_dict(self, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load what `optimizer_state_dict` returned (every rank reads the same file)."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def broadcast(self, value: Item) -> Item:
        """Rank 0's `value` on every rank (pickled); `value` itself in one process."""
        if not self.distributed:
            return value
        carrier = [value if self.leads else None]
        dist.broadcast_object_list(carrier, src=0, device=self.device if self.device.type == "cuda" else None)
        return carrier[0]

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


def init_ranks(device_type: str = "cpu", parallelism: Parallelism = "ddp") -> Ranks:
    """Join the process group `torchrun` describes in the environment; one rank without torchrun.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. With device_type
    "cuda" each rank uses GPU LOCAL_RANK and the NCCL backend; with "cpu", gloo. Call once per
    process, before building models; `close_ranks` at the end. `parallelism`: see `Ranks`.
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
    return Ranks(dist.get_rank(), dist.get_world_size(), device, parallelism)


def close_ranks(ranks: Ranks, together: bool = True) -> None:
    """Leave the process group (nothing to do for a single process, or when vLLM's rollout engine,
    which shares it under the external launcher, already destroyed it on its shutdown).

    `together` (a clean end, every rank here): wait for the others first. A gloo rank that tears
    down while its peer still sends can abort (`terminate called without an active exception`).
    After an error the others may never come: leave at once.
    """
    if ranks.distributed and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
