"""Data-parallel training under ``torchrun``: the process group, who this process is in it, and
reductions over the ranks (the ``--nproc`` launcher is :mod:`cnnkit.training.launch`, the
sharded sampler :mod:`cnnkit.data.samplers`).

``torchrun --nproc-per-node N -m cnnkit train ...`` starts N copies of the CLI with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous in the environment; :func:`init` joins them into
one process group (NCCL on CUDA, gloo on the CPU). Every rank trains on its own shard of each
epoch and DistributedDataParallel averages the gradients; sums of losses and counts are
all-reduced, so every rank sees the metrics of the whole validation set; only rank 0 writes
files, logs and draws progress bars.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import torch

from . import errors
from .errors import CnnkitError, ConfigError

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def under_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this context created the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over all ranks (the values themselves with one process)."""
        if not self.enabled:
            return [float(v) for v in values]
        import torch.distributed as dist

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank."""
        return self.all_reduce_sum([0.0 if flag else 1.0])[0] == 0.0

    def on_main(self, action: Callable[[], _T]) -> _T | None:
        """Run ``action`` on rank 0 only; a CnnkitError it raises is raised on every rank (so the
        others do not wait forever for a rank that has stopped)."""
        error: CnnkitError | None = None
        result = None
        if self.is_main:
            try:
                result = action()
            except CnnkitError as exc:
                error = exc
        if self.enabled:
            import torch.distributed as dist

            payload = [None if error is None else (type(error).__name__, str(error), error.exit_code)]
            dist.broadcast_object_list(payload, src=0)
            if payload[0] is not None and error is None:
                error = rebuild_error(*payload[0])
        if error is not None:
            raise error
        return result

    def gather_rows(self, rows: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``rows`` and their dataset ``indices`` of every rank, concatenated (equal counts per
        rank: shards of a padded :class:`EpochSampler`)."""
        if not self.enabled:
            return rows, indices
        import torch.distributed as dist

        device = self._collective_device()
        rows, indices = rows.to(device).contiguous(), indices.to(device).contiguous()
        all_rows = [torch.empty_like(rows) for _ in range(self.world_size)]
        all_indices = [torch.empty_like(indices) for _ in range(self.world_size)]
        dist.all_gather(all_rows, rows)
        dist.all_gather(all_indices, indices)
        return torch.cat(all_rows).cpu(), torch.cat(all_indices).cpu()


def init(device: torch.device) -> DistContext:
    """Join the torchrun job this process belongs to, if any, on ``device``.

    On CUDA each process takes the GPU of its ``LOCAL_RANK``; the backend is NCCL there and
    gloo on the CPU. A process group created elsewhere (by the caller) is used as it is.
    """
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistContext(device=device)
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "mps":
        raise ConfigError("distributed training runs on CUDA or the CPU, not on Apple MPS: use --device cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world, local_rank, device, owns)


def shutdown(ctx: DistContext) -> None:
    if ctx.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_ddp(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when there are several processes, else itself."""
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def rebuild_error(type_name: str, message: str, exit_code: int) -> CnnkitError:
    """The CnnkitError another process reported, by its class name (else by its exit code)."""
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, CnnkitError)]
    cls = next((c for c in classes if c.__name__ == type_name), None)
    if cls is None:
        cls = next((c for c in classes if c.exit_code == exit_code), CnnkitError)
    return cls(message)
