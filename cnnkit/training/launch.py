"""``--nproc N``: train in N processes on this machine, as ``torchrun --standalone
--nproc-per-node N`` does (through torchrun's own launcher API), each process running
:func:`~cnnkit.training.run.train` under the process group :mod:`cnnkit.distributed` joins."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
from typing import Any

from ..config import TrainConfig
from ..distributed import rebuild_error
from ..errors import CnnkitError
from .result import TrainResult

log = logging.getLogger(__name__)


def launch(cfg: TrainConfig, verbosity: int | None = None) -> Any:
    """Run ``train(cfg)`` in ``cfg.nproc`` processes on this machine, as ``torchrun --standalone
    --nproc-per-node N`` does (through torchrun's own launcher API), and return rank 0's
    TrainResult; a CnnkitError of rank 0 is raised here, with its exit code."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

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
            elastic_launch(config, sys.executable)("-m", "cnnkit.training.worker", cfg_path, result_path, str(level))
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
        raise rebuild_error(outcome["type"], outcome["error"], outcome["exit_code"])
    return TrainResult(**outcome["result"])


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None
