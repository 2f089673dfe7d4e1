"""Data-parallel training under ``torchrun``: the process group, sharded samplers, reductions
and the ``--nproc`` launcher.

``torchrun --nproc-per-node N -m cnnkit train ...`` starts N copies of the CLI with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous in the environment; :func:`init` joins them into
one process group (NCCL on CUDA, gloo on the CPU). Every rank trains on its own shard of each
epoch and DistributedDataParallel averages the gradients; sums of losses and counts are
all-reduced, so every rank sees the metrics of the whole validation set; only rank 0 writes
files, logs and draws progress bars.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
from torch.utils.data import Sampler

from .config import TrainConfig
from .errors import CnnkitError, ConfigError, Interrupted

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
                error = _rebuild_error(*payload[0])
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


# --- sampling -------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of every random choice in ``epoch``: a resumed run repeats it exactly."""
    return seed * 100_003 + epoch


class EpochSampler(Sampler[int]):
    """Indices of one epoch for one rank, a pure function of (seed, epoch, rank).

    DistributedSampler's scheme (one permutation shared by all ranks, padded to a multiple of
    the world size, rank ``r`` taking every ``world_size``-th index from ``r``), plus weighted
    draws (``--sampler balanced``) and unpadded shards for evaluation (``pad=False``), where a
    repeated image would be counted twice. With one process it is a plain shuffle.
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: int = 0,
        weights: Sequence[float] | torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if self.weights is None and not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator()
        generator.manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is not None:
            return torch.multinomial(self.weights, self.size, replacement=True, generator=generator).tolist()
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.world_size > 1:
            if self.pad and order:
                total = math.ceil(len(order) / self.world_size) * self.world_size
                order = (order * math.ceil(total / len(order)))[:total]
            order = order[self.rank :: self.world_size]
        return iter(order)

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.size
        if self.pad:
            return math.ceil(self.size / self.world_size)
        return len(range(self.rank, self.size, self.world_size))


# --- launching torchrun ---------------------------------------------------------------------


def launch(cfg: TrainConfig, verbosity: int | None = None) -> Any:
    """Run ``train(cfg)`` in ``cfg.nproc`` processes on this machine, as ``torchrun --standalone
    --nproc-per-node N`` does (through torchrun's own launcher API), and return rank 0's
    TrainResult; a CnnkitError of rank 0 is raised here, with its exit code."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .engine import TrainResult

    level = verbosity if verbosity is not None else logging.getLogger("cnnkit").getEffectiveLevel()
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=cfg.nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
    )
    elastic_log = logging.getLogger("torch.distributed.elastic")
    saved_level, saved_threads = elastic_log.level, os.environ.get("OMP_NUM_THREADS")
    with tempfile.TemporaryDirectory(prefix="cnnkit-nproc-") as tmp:
        cfg_path, result_path = os.path.join(tmp, "config.json"), os.path.join(tmp, "result.json")
        with open(cfg_path, "w", encoding="utf-8") as handle:
            json.dump(dataclasses.replace(cfg, nproc=1).to_dict(), handle)
        log.info("training in %d processes (torchrun --standalone --nproc-per-node %d)", cfg.nproc, cfg.nproc)
        if saved_threads is None:  # as torchrun: N processes must not each take every core
            os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.nproc))
        elastic_log.setLevel(logging.CRITICAL)  # a failed worker is reported below, in one line
        try:
            elastic_launch(config, sys.executable)("-m", "cnnkit.distributed", cfg_path, result_path, str(level))
        except ChildFailedError:
            pass
        finally:
            elastic_log.setLevel(saved_level)
            if saved_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
        # Rank 0's outcome; when it was stopped because another rank failed, that rank's.
        outcomes = (_read_json(f"{result_path}.{rank}") for rank in range(cfg.nproc))
        outcome = next((o for o in outcomes if o is not None), None)
    if outcome is None:
        raise CnnkitError(f"the {cfg.nproc} training processes failed; see the log above")
    if "error" in outcome:
        raise _rebuild_error(outcome["type"], outcome["error"], outcome["exit_code"])
    return TrainResult(**outcome["result"])


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _rebuild_error(type_name: str, message: str, exit_code: int) -> CnnkitError:
    from . import errors

    cls = getattr(errors, type_name, None)
    if not (isinstance(cls, type) and issubclass(cls, CnnkitError)):
        cls = next((c for c in _error_classes() if c.exit_code == exit_code), CnnkitError)
    return cls(message)


def _error_classes() -> list[type[CnnkitError]]:
    from . import errors

    return [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, CnnkitError)]


def _worker_main(argv: list[str]) -> int:
    """One torchrun worker of :func:`launch`: train, and have rank 0 report the outcome."""
    cfg_path, result_path, level = argv[0], argv[1], int(argv[2])
    from .cli import _setup_logging  # the CLI's one-line log format
    from .engine import train

    rank = int(os.environ.get("RANK", "0"))
    _setup_logging({logging.WARNING: -1, logging.INFO: 0}.get(level, 1) if rank == 0 else -1)
    with open(cfg_path, encoding="utf-8") as handle:
        cfg = TrainConfig.from_dict(json.load(handle))
    try:
        result = train(cfg)
        outcome: dict[str, Any] = {"result": dataclasses.asdict(result)}
        code = 0
    except CnnkitError as exc:
        outcome = {"type": type(exc).__name__, "error": str(exc), "exit_code": exc.exit_code}
        code = exc.exit_code
    except KeyboardInterrupt:
        exc = Interrupted("interrupted")
        outcome = {"type": "Interrupted", "error": str(exc), "exit_code": exc.exit_code}
        code = exc.exit_code
    if rank == 0 or code != 0:
        path = f"{result_path}.{rank}"
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(outcome, handle)
        os.replace(path + ".tmp", path)
    return code


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))

