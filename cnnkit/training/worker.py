"""One process of a ``--nproc`` job (``python -m cnnkit.training.worker CONFIG RESULT LEVEL``,
started by :func:`cnnkit.training.launch.launch` through torchrun's launcher): train, and have
rank 0 (or a failing rank) report the outcome as JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from ..config import TrainConfig
from ..errors import CnnkitError, Interrupted
from ..logs import setup_logging, verbosity_of
from .run import train


def main(argv: list[str]) -> int:
    cfg_path, result_path, level = argv[0], argv[1], int(argv[2])
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(verbosity_of(level) if rank == 0 else -1)
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
    sys.exit(main(sys.argv[1:]))
