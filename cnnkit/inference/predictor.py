"""The model side of inference: a trained model with its own preprocessing and class names,
scoring decoded images, preprocessed batches or image files (decoded in DataLoader workers)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.folders import ImageDataset, collate, load_category_names
from ..data.transforms import build_transforms, tta_views
from ..errors import ConfigError
from ..models.checkpoint import Checkpoint, load_checkpoint
from ..models.exported import is_onnx_file
from ..runtime import available_cores, resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Guess:
    label: str  # the class label (its folder name)
    name: str  # human-readable name, or the label when none is known
    probability: float


@dataclass(frozen=True)
class Prediction:
    path: str
    top: list[Guess] = field(default_factory=list)
    error: str | None = None
    abstained: bool = False  # top-1 confidence below the checkpoint's abstain threshold

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self, abstain: bool = False) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        row: dict = {"path": self.path}
        if abstain:
            row["predicted"] = "unknown" if self.abstained else self.top[0].label
        # 6 decimals, as in CSV: beyond that, floats differ with the batch an image was in.
        row["predictions"] = [{**g.__dict__, "probability": round(g.probability, 6)} for g in self.top]
        return row


CPU_BATCH_SIZE = 8
GPU_BATCH_SIZE = 32


def scoring_defaults(device: torch.device, batch_size: int | None, workers: int | None) -> tuple[int, int]:
    """Batch size and decoding workers for scoring on ``device``, where not given.

    Measured on a 2-core CPU (benchmarks/RESULTS.md): CPU inference is cache-bound, so batches
    of 4-8 ran 1.3-2x faster than 32; and decoding workers there only take cores from torch's
    threads (0 workers was as fast or faster than 1 or 2). With more cores, or a GPU doing the
    arithmetic, decoding in workers overlaps with the forward pass.
    """
    if batch_size is None:
        batch_size = CPU_BATCH_SIZE if device.type == "cpu" else GPU_BATCH_SIZE
    if workers is None:
        cores = min(4, available_cores())
        workers = 0 if device.type == "cpu" and cores <= 2 else cores
    return batch_size, workers


class Predictor:
    """A trained model with its own preprocessing and class names, ready to score images."""

    def __init__(
        self,
        checkpoint: Checkpoint | str,
        device: str = "auto",
        category_names: str | None = None,
        tta: str | None = None,
    ):
        self.backend = None  # an exported ONNX model (OnnxBackend) scoring instead of self.model
        if isinstance(checkpoint, str) and is_onnx_file(checkpoint):
            from .onnx import OnnxBackend

            self.backend = OnnxBackend(checkpoint, device)
            checkpoint = self.backend.checkpoint  # weightless: classes, names, preprocessing
        self.checkpoint = load_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
        self.classes = self.checkpoint.classes
        self.names = dict(self.checkpoint.class_names)
        if category_names:
            self.names = load_category_names(category_names, self.classes)
        self.device = resolve_device(device)
        self.model = self.checkpoint.build_model(self.device) if self.backend is None else None
        # NHWC is 1.3-1.4x faster for these CNNs on CPU (benchmarks/RESULTS.md); MPS lacks kernels.
        self.memory_format = torch.channels_last if self.device.type != "mps" else torch.contiguous_format
        if self.model is not None:
            self.model = self.model.to(memory_format=self.memory_format)
        self.transform = build_transforms(self.checkpoint.preprocess, train=False)
        # The TTA asked for, else the one the checkpoint was calibrated with (cnnkit evaluate --tta).
        self.tta = tta or str(self.checkpoint.calibration.get("tta", "none"))

    def abstain_threshold(self) -> float:
        """The confidence below which ``--abstain`` answers unknown (set by ``cnnkit evaluate``)."""
        threshold = self.checkpoint.calibration.get("abstain_threshold")
        if threshold is None:
            raise ConfigError(
                "--abstain: this checkpoint has no abstain threshold; set one with "
                "cnnkit evaluate CKPT DATA_DIR --target-coverage 0.95"
            )
        return float(threshold)

    def cap_top_k(self, top_k: int) -> int:
        """``top_k`` capped at the number of classes (with a warning when it was more)."""
        if top_k > len(self.classes):
            log.warning("--top-k %d is more than the %d classes; showing %d", top_k, len(self.classes), len(self.classes))
        return min(top_k, len(self.classes))

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """Class probabilities (rows sum to 1) for a batch of preprocessed images, with the
        checkpoint's fitted temperature applied unless ``calibrated`` is False.

        With test-time augmentation (:attr:`tta`) the views are averaged in log space (their
        logits, renormalised: a geometric mean of their probabilities), so that a temperature
        fitted on averaged views applies unchanged, whether or not it is applied before."""
        views = tta_views(batch, self.tta)
        if len(views) == 1:
            if self.backend is not None:  # (as it is: no round trip through the log)
                return self.backend.probabilities(batch)
            return self._log_probabilities(batch, calibrated).exp()
        log_probs = self._log_probabilities(torch.cat(views), calibrated)
        return torch.softmax(log_probs.view(len(views), len(batch), -1).mean(dim=0), dim=1)

    def _log_probabilities(self, batch: torch.Tensor, calibrated: bool) -> torch.Tensor:
        if self.backend is not None:  # the export's output is already (calibrated) probabilities
            return self.backend.probabilities(batch).clamp_min(1e-30).log()
        log_probs = self.model(batch.to(self.device, memory_format=self.memory_format)).float()
        if calibrated and self.checkpoint.temperature != 1.0:
            log_probs = torch.log_softmax(log_probs / self.checkpoint.temperature, dim=1)
        return log_probs.cpu()

    def _guesses(self, probs: torch.Tensor, k: int) -> list[list[Guess]]:
        values, indices = probs.topk(k, dim=1)
        return [
            [Guess(self.classes[i], self.names.get(self.classes[i], self.classes[i]), float(p))
             for p, i in zip(row_p.tolist(), row_i.tolist())]
            for row_p, row_i in zip(values, indices)
        ]

    def predict_images(self, images: Sequence[Image.Image], top_k: int = 1) -> list[list[Guess]]:
        """Top-K guesses for decoded RGB images, in one forward pass."""
        if not images:
            return []
        batch = torch.stack([self.transform(image) for image in images])
        return self._guesses(self.probabilities(batch), self.cap_top_k(top_k))

    def score_paths(
        self,
        paths: Sequence[str],
        batch_size: int | None = None,
        workers: int | None = None,
        progress: bool = False,
        calibrated: bool = True,
    ) -> Iterator[tuple[str, torch.Tensor | None, str | None]]:
        """``(path, class probabilities or None, error or None)`` for each path, in order, as
        batches are scored; images are decoded in DataLoader workers (see :func:`scoring_defaults`)."""
        batch_size, workers = scoring_defaults(self.device, batch_size, workers)
        n_batches = math.ceil(len(paths) / batch_size)
        workers = min(workers, n_batches if n_batches > 1 else 0)
        loader = DataLoader(
            ImageDataset(paths, self.transform, max_pixels=self.checkpoint.preprocess.max_pixels),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate,
        )
        with tqdm(total=len(paths), unit="img", disable=not progress, leave=False, dynamic_ncols=True) as bar:
            for images, indices, errors in loader:
                probs = iter(self.probabilities(images, calibrated) if images is not None else [])
                for index, error in zip(indices.tolist(), errors):
                    if error is not None:
                        yield paths[index], None, error[1]
                    else:
                        yield paths[index], next(probs), None
                bar.update(len(indices))

    def predict_paths(
        self,
        paths: Sequence[str],
        top_k: int = 1,
        batch_size: int | None = None,
        workers: int | None = None,
        progress: bool = False,
    ) -> Iterator[Prediction]:
        """Predictions for ``paths``, in order, as they are scored; bad files give error rows."""
        k = self.cap_top_k(top_k)
        for path, probs, error in self.score_paths(paths, batch_size, workers, progress):
            if error is not None:
                yield Prediction(path, error=error)
            else:
                yield Prediction(path, self._guesses(probs[None], k)[0])
