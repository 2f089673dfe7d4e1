"""One model as a worker serves it: the predictor with its preprocessing, version and drift
monitor, loaded and checked before it takes traffic (:func:`load_served_model`).

A :class:`ServedModel` never changes; a reload makes a new one and the service swaps the
reference, so each request is decoded, batched and scored by one model from start to end.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import numpy as np
import torch

from ..config import ServeConfig
from ..data.transforms import build_transforms
from ..drift import DriftMonitor, check_reference
from ..errors import CheckpointError
from ..models.exported import model_version


@dataclasses.dataclass(frozen=True, eq=False)
class ServedModel:
    path: str
    version: str
    predictor: Any  # cnnkit.inference.predictor.Predictor
    transform: Callable[[Any], torch.Tensor]
    max_pixels: int
    backend: str  # torch, onnxruntime, onnxruntime-int8, openvino, openvino-int8
    drift: DriftMonitor | None
    # (threshold, combined) when the checkpoint has a combined unknown threshold (evaluate
    # --target-coverage with open-set statistics): each answer then says whether it is unknown.
    unknown_rule: tuple[float, bool] | None = None

    @property
    def checkpoint(self) -> Any:
        return self.predictor.checkpoint

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    @property
    def image_size(self) -> int:
        return self.checkpoint.preprocess.image_size

    def score(self, batch: torch.Tensor, with_known: bool = False) -> torch.Tensor:
        """Class probabilities; with ``with_known`` and a combined :attr:`unknown_rule`, each row
        ends with the open-set known score (one tensor, so the batcher slices both together)."""
        if not (with_known and self.unknown_rule is not None and self.unknown_rule[1]):
            return torch.from_numpy(self.predictor.probabilities(batch))
        probs, distance = self.predictor.scores(batch, distances=True)
        known = np.asarray(self.predictor.known_scores(probs, distance), dtype=probs.dtype)
        return torch.from_numpy(np.concatenate([probs, known[:, None]], axis=1))

    def unknown_flags(self, scored: torch.Tensor) -> tuple[torch.Tensor, list[bool] | None]:
        """``(probabilities, per-image unknown flags or None)`` of a ``score(with_known=True)`` result."""
        if self.unknown_rule is None:
            return scored, None
        threshold, combined = self.unknown_rule
        probs, value = (scored[:, :-1], scored[:, -1]) if combined else (scored, scored.max(dim=1).values)
        return probs, (value < threshold).tolist()

    def check(self) -> None:
        """One forward pass on a blank image: it must give one probability per class."""
        size = self.image_size
        probs = self.score(torch.zeros(1, 3, size, size))
        n = len(self.classes)
        if tuple(probs.shape) != (1, n) or not bool(torch.isfinite(probs).all()) or abs(float(probs.sum()) - 1) > 1e-3:
            raise CheckpointError(f"{self.path}: the warm-up forward pass gave {tuple(probs.shape)} values, "
                                  f"not {n} probabilities summing to 1")

    def images_per_second(self, batch: int, repeats: int = 2) -> float:
        """Forward-pass rate at ``batch`` images, the best of ``repeats`` passes."""
        size = self.image_size
        images = torch.zeros(batch, 3, size, size)
        best = float("inf")
        for _ in range(repeats):
            began = time.perf_counter()
            self.score(images)
            best = min(best, time.perf_counter() - began)
        return batch / max(best, 1e-6)


def load_served_model(cfg: ServeConfig, path: str, *, check: bool = True, version: str | None = None) -> ServedModel:
    """Load ``path`` (a checkpoint, an exported .onnx or OpenVINO .xml) as ``cfg`` serves it; ``check`` runs
    :meth:`ServedModel.check`; ``version`` is the file's :func:`model_version` where the caller
    has hashed it already. Raises CnnkitError (the file, its classes, names or preprocessing)."""
    from ..inference.predictor import Predictor

    predictor = Predictor(path, cfg.device, cfg.category_names, tta=cfg.tta)  # (a missing or bad file: CheckpointError)
    version = version or model_version(path)
    ckpt = predictor.checkpoint
    exported = predictor.backend
    max_pixels = min(cfg.max_pixels, ckpt.preprocess.max_pixels)
    transform = build_transforms(dataclasses.replace(ckpt.preprocess, max_pixels=max_pixels), train=False)
    reference = check_reference(getattr(ckpt, "reference_stats", None), len(predictor.classes))
    unknown_rule = predictor.abstain_rule() if "unknown_threshold" in ckpt.calibration else None
    model = ServedModel(
        path=path,
        version=version,
        predictor=predictor,
        transform=transform,
        max_pixels=max_pixels,
        backend=exported.name if exported is not None else "torch",
        drift=DriftMonitor(reference, cfg.drift_window) if reference is not None else None,
        unknown_rule=unknown_rule,
    )
    if check:
        model.check()
    return model


MODEL_SUFFIXES = (".pt", ".pth", ".onnx", ".xml")


def model_file(path: str) -> str:
    """``path``, or the model file in the folder ``path`` (SageMaker unpacks model.tar.gz into
    /opt/ml/model): its only .pt/.pth/.onnx/.xml file, else its one ``model.*``, else its one ``best.*``."""
    if not os.path.isdir(path):
        return path
    names = sorted(name for name in os.listdir(path) if name.endswith(MODEL_SUFFIXES) and not name.startswith(".")
                   and os.path.isfile(os.path.join(path, name)))
    if len(names) == 1:
        return os.path.join(path, names[0])
    for stem in ("model", "best"):
        matches = [name for name in names if os.path.splitext(name)[0] == stem]
        if len(matches) == 1:
            return os.path.join(path, matches[0])
        if matches:
            break  # model.pt and model.onnx: which one is meant cannot be told
    if not names:
        raise CheckpointError(f"no model in the folder {path}: put a checkpoint (.pt) or an exported model (.onnx, .xml) "
                              "there, or name the file")
    raise CheckpointError(f"{len(names)} models in the folder {path} ({', '.join(names)}): name the file to serve, "
                          "or call it model.pt")
