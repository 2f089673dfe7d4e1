"""The model side of inference: a trained model with its own preprocessing and class names,
scoring decoded images, preprocessed batches or image files.

Probabilities come out as numpy arrays, whatever runs the model. A checkpoint's model runs in
torch; an export (ONNX, OpenVINO) on its own runtime, and then nothing here imports torch unless
decoding workers are asked for: its import is seconds of every short ``cnnkit predict``
(benchmarks/RESULTS.md, Quantization).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..data.folders import ImageDataset, batched, collate_arrays, load_category_names
from ..data.transforms import build_transforms, tta_views
from ..errors import ConfigError
from ..models.exported import is_exported_model, is_openvino_file
from ..runtime import available_cores, prefetch, resolve_device

if TYPE_CHECKING:
    from ..models.checkpoint import Checkpoint

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
    abstained: bool = False  # below the checkpoint's abstain threshold (see Predictor.abstain_rule)
    known_score: float | None = None  # the open-set score --abstain thresholds, where it applies

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


@contextlib.contextmanager
def _nothing() -> Iterator[list]:
    yield []


def scoring_defaults(device_type: str, batch_size: int | None, workers: int | None) -> tuple[int, int]:
    """Batch size and decoding workers for scoring on a device of ``device_type`` (``cpu``,
    ``cuda``...), where not given.

    Measured on a 2-core CPU (benchmarks/RESULTS.md): CPU inference is cache-bound, so batches
    of 4-8 ran 1.3-2x faster than 32; and decoding workers there only take cores from torch's
    threads (0 workers was as fast or faster than 1 or 2). With more cores, or a GPU doing the
    arithmetic, decoding in workers overlaps with the forward pass. (With 0 workers not asked for,
    an exported model's batches are still decoded beside scoring, in a thread: see
    :meth:`Predictor.score_paths_with_distance`.)
    """
    if batch_size is None:
        batch_size = CPU_BATCH_SIZE if device_type == "cpu" else GPU_BATCH_SIZE
    if workers is None:
        cores = min(4, available_cores())
        workers = 0 if device_type == "cpu" and cores <= 2 else cores
    return batch_size, workers


def export_backend(path: str, device: str = "auto", threads: int | None = None) -> Any:
    """The runtime that scores an exported model: OpenVINO for an IR (``.xml``), ONNX Runtime for ``.onnx``."""
    if is_openvino_file(path):
        from .openvino import OpenVinoBackend

        return OpenVinoBackend(path, device, threads)
    from .onnx import OnnxBackend

    return OnnxBackend(path, device, threads)


class Predictor:
    """A trained model with its own preprocessing and class names, ready to score images.

    A checkpoint (a path or a :class:`Checkpoint`) runs in torch: ``model``, ``device``,
    ``memory_format`` and ``open_set`` are set. An export's path runs on ``backend``
    (:func:`export_backend`), ``model`` is None, and its ``checkpoint`` is built (importing torch)
    only when asked for.
    """

    def __init__(
        self,
        checkpoint: Checkpoint | str,
        device: str = "auto",
        category_names: str | None = None,
        tta: str | None = None,
    ):
        self.backend: Any = None  # an exported model (export_backend) scoring instead of self.model
        self.model: Any = None
        self.open_set: Any = None  # OpenSetScorer: the feature distance needs a checkpoint's backbone
        self._checkpoint = None
        if isinstance(checkpoint, str) and is_exported_model(checkpoint):
            self.backend = export_backend(checkpoint, device)
            described: Any = self.backend.info  # classes, names, preprocessing, calibration
            self.device_type = self.backend.device_type
        else:
            from ..models.checkpoint import load_checkpoint

            described = self._checkpoint = load_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
            self._load_model(device)
        self.classes = described.classes
        self.names = dict(described.class_names)
        if category_names:
            self.names = load_category_names(category_names, self.classes)
        self.preprocess = described.preprocess
        self._described = described
        # An export's batches are numpy arrays from decoding to scoring; torch's, tensors sharing their memory.
        self.transform = build_transforms(self.preprocess, train=False, arrays=self.backend is not None)
        # The TTA asked for, else the one the checkpoint was calibrated with (cnnkit evaluate --tta).
        self.tta = tta or str(self.calibration.get("tta", "none"))

    def _load_model(self, device: str) -> None:
        import torch

        from ..models.openset import OpenSetScorer, check_open_set

        ckpt = self._checkpoint
        self.device = resolve_device(device)
        self.device_type = self.device.type
        # NHWC is 1.3-1.4x faster for these CNNs on CPU (benchmarks/RESULTS.md); MPS lacks kernels.
        self.memory_format = torch.channels_last if self.device.type != "mps" else torch.contiguous_format
        self.model = ckpt.build_model(self.device).to(memory_format=self.memory_format)
        stats = check_open_set(ckpt.open_set, len(ckpt.classes))
        self.open_set = OpenSetScorer(stats) if stats is not None else None

    @property
    def calibration(self) -> dict[str, Any]:
        """The fitted calibration: temperature (a checkpoint's; an export has it in its graph), thresholds, TTA."""
        return self._described.calibration

    @property
    def checkpoint(self) -> Checkpoint:
        """The checkpoint, or of an export a weightless one describing it (built on first use: it imports torch)."""
        return self._checkpoint if self._checkpoint is not None else self.backend.checkpoint

    def abstain_threshold(self) -> float:
        """The confidence below which ``--abstain`` answers unknown (set by ``cnnkit evaluate``)."""
        threshold = self.calibration.get("abstain_threshold")
        if threshold is None:
            raise ConfigError(
                "--abstain: this checkpoint has no abstain threshold; set one with "
                "cnnkit evaluate CKPT DATA_DIR --target-coverage 0.95"
            )
        return float(threshold)

    def abstain_rule(self) -> tuple[float, bool]:
        """``(threshold, combined)``: ``--abstain`` answers unknown below ``threshold`` of the
        combined open-set score when ``combined``, else of the top-1 confidence (a checkpoint
        without open-set statistics, or an export, which has no features to measure)."""
        combined = self.calibration.get("unknown_threshold")
        if combined is not None and self.open_set is not None:
            return float(combined), True
        if combined is not None:
            log.info("the open-set score needs the backbone's features, which only a checkpoint (.pt) gives: "
                     "%s abstains on confidence alone", "this export" if self.backend is not None else "this model")
        return self.abstain_threshold(), False

    def class_index(self, target: str) -> int:
        """The index of a class given by its label or, where one class has it, its readable name;
        ConfigError listing the labels otherwise."""
        if target in self.classes:
            return self.classes.index(target)
        by_name = [label for label in self.classes if self.names.get(label) == target]
        if len(by_name) == 1:
            return self.classes.index(by_name[0])
        shown = ", ".join(self.classes[:20]) + (" ..." if len(self.classes) > 20 else "")
        raise ConfigError(f"{target!r} is not a class of this model; its labels: {shown}")

    def cap_top_k(self, top_k: int) -> int:
        """``top_k`` capped at the number of classes (with a warning when it was more)."""
        if top_k > len(self.classes):
            log.warning("--top-k %d is more than the %d classes; showing %d", top_k, len(self.classes), len(self.classes))
        return min(top_k, len(self.classes))

    def probabilities(self, batch: Any, calibrated: bool = True) -> np.ndarray:
        """Class probabilities (rows sum to 1) for a batch of preprocessed images (an array, or a
        CPU tensor), with the checkpoint's fitted temperature applied unless ``calibrated`` is False.

        With test-time augmentation (:attr:`tta`) the views are averaged in log space (their
        logits, renormalised: a geometric mean of their probabilities), so that a temperature
        fitted on averaged views applies unchanged, whether or not it is applied before."""
        return self.scores(batch, calibrated)[0]

    def scores(self, batch: Any, calibrated: bool = True, distances: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`probabilities`, and with ``distances`` (and open-set statistics) each image's
        feature distance to the nearest training class (:class:`OpenSetScorer`; of the image as
        it is, not of its TTA views), else None."""
        views = tta_views(np.asarray(batch), self.tta)
        if self.backend is None:
            return self._model_scores(views, calibrated, distances)
        # The export's output is already (calibrated) probabilities.
        if len(views) == 1:
            return self.backend.probabilities(views[0]), None
        probs = self.backend.probabilities(np.concatenate(views))
        return _view_average(np.log(np.maximum(probs, 1e-30)), len(views)), None

    def _model_scores(self, views: list[np.ndarray], calibrated: bool,
                      distances: bool) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        from ..models.openset import capture_features

        inputs = torch.from_numpy(np.concatenate(views) if len(views) > 1 else np.ascontiguousarray(views[0]))
        features = capture_features(self.model, self.checkpoint.arch) if distances and self.open_set else _nothing()
        with torch.inference_mode(), features as seen:
            log_probs = self.model(inputs.to(self.device, memory_format=self.memory_format)).float()
            if calibrated and self.checkpoint.temperature != 1.0:
                log_probs = torch.log_softmax(log_probs / self.checkpoint.temperature, dim=1)
            rows = len(views[0])
            distance = self.open_set.distances(seen[0][:rows]).float().cpu().numpy() if seen else None  # (the first view)
            if len(views) == 1:
                return log_probs.exp().cpu().numpy(), distance
        return _view_average(log_probs.cpu().numpy(), len(views)), distance

    def known_scores(self, probs: np.ndarray, distance: np.ndarray) -> list[float]:
        """The combined open-set score of each image (higher: more like the training classes)."""
        probs = np.asarray(probs)
        return self.open_set.known_scores(probs.max(axis=1).astype(np.float64),
                                          np.asarray(distance, dtype=np.float64)).tolist()

    def _guesses(self, probs: np.ndarray, k: int) -> list[list[Guess]]:
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (ties: the lower class index first)
        return [
            [Guess(self.classes[i], self.names.get(self.classes[i], self.classes[i]), float(row[i])) for i in indices]
            for row, indices in zip(probs, top.tolist())
        ]

    def predict_images(self, images: Sequence[Image.Image], top_k: int = 1) -> list[list[Guess]]:
        """Top-K guesses for decoded RGB images, in one forward pass."""
        if not images:
            return []
        batch = np.stack([np.asarray(self.transform(image)) for image in images])
        return self._guesses(self.probabilities(batch), self.cap_top_k(top_k))

    def score_paths(
        self,
        paths: Sequence[str],
        batch_size: int | None = None,
        workers: int | None = None,
        progress: bool = False,
        calibrated: bool = True,
    ) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
        """``(path, class probabilities or None, error or None)`` for each path, in order, as
        batches are scored; images are decoded in DataLoader workers (see :func:`scoring_defaults`)."""
        for path, probs, _, error in self.score_paths_with_distance(paths, batch_size, workers, progress, calibrated,
                                                                   distances=False):
            yield path, probs, error

    def score_paths_with_distance(
        self, paths: Sequence[str], batch_size: int | None = None, workers: int | None = None, progress: bool = False,
        calibrated: bool = True, distances: bool = True,
    ) -> Iterator[tuple[str, np.ndarray | None, float | None, str | None]]:
        """:meth:`score_paths`' rows, each with the image's open-set feature distance (None
        without open-set statistics, or when ``distances`` is False) before the error."""
        overlap = workers is None  # --workers 0, asked for: decoding in the main thread, in turn with scoring
        batch_size, workers = scoring_defaults(self.device_type, batch_size, workers)
        n_batches = math.ceil(len(paths) / batch_size)
        workers = min(workers, n_batches if n_batches > 1 else 0)
        dataset = ImageDataset(paths, self.transform, max_pixels=self.preprocess.max_pixels)
        if workers:
            from torch.utils.data import DataLoader

            batches: Any = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_arrays)
        else:
            batches = batched(dataset, batch_size)
            # An export's runtime scores in its own threads with the GIL released: decoding the next
            # batch in a thread meanwhile is faster end to end than in turn (benchmarks/RESULTS.md,
            # Quantization); torch's forward pass gained nothing from it.
            batches = prefetch(batches) if overlap and self.backend is not None else batches
        with tqdm(total=len(paths), unit="img", disable=not progress, leave=False, dynamic_ncols=True) as bar:
            for images, indices, errors in batches:
                probs, distance = self.scores(images, calibrated, distances) if images is not None else (None, None)
                good = iter(range(len(probs)) if probs is not None else [])
                for index, error in zip(indices.tolist(), errors):
                    if error is not None:
                        yield paths[index], None, None, error[1]
                    else:
                        i = next(good)
                        yield paths[index], probs[i], float(distance[i]) if distance is not None else None, None
                bar.update(len(indices))

    def predict_paths(
        self,
        paths: Sequence[str],
        top_k: int = 1,
        batch_size: int | None = None,
        workers: int | None = None,
        progress: bool = False,
        known_score: bool = False,
    ) -> Iterator[Prediction]:
        """Predictions for ``paths``, in order, as they are scored; bad files give error rows.
        ``known_score`` (with open-set statistics) fills each prediction's combined score."""
        k = self.cap_top_k(top_k)
        distances = known_score and self.open_set is not None
        for path, probs, distance, error in self.score_paths_with_distance(paths, batch_size, workers, progress,
                                                                          distances=distances):
            if error is not None:
                yield Prediction(path, error=error)
            else:
                score = self.known_scores(probs[None], np.array([distance]))[0] if distance is not None else None
                yield Prediction(path, self._guesses(probs[None], k)[0], known_score=score)


def _view_average(log_probs: np.ndarray, views: int) -> np.ndarray:
    """The TTA views' log-probabilities (views x N rows, view-major) averaged and renormalised."""
    mean = log_probs.reshape(views, -1, log_probs.shape[1]).mean(axis=0)
    exp = np.exp(mean - mean.max(axis=1, keepdims=True))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
