"""``POST /explain``: a Grad-CAM picture of why the served model gave an image a class, as
``cnnkit explain`` draws it (the image as the model saw it, and the heat map over it).

Grad-CAM needs a backward pass through hooks on the model's last convolutional block; hooks on
the model the batcher scores with would fire in its forward passes too. So explanations run on
a private copy of the primary model (made on the first request for each model version: one more
copy of the weights in the worker's memory), one at a time per worker. The probability shown is
the served one (the primary's, with its calibration and test-time augmentation), so it matches
what ``/predict`` answers for the image.
"""

from __future__ import annotations

import copy
import io
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..data.transforms import model_view
from ..errors import CnnkitError, ConfigError, require_extra
from ..inference.cam import HeatMapper, caption
from .model import ServedModel
from .parsing import HttpError

BUSY_RETRY_S = 1  # Retry-After of a request that found the worker explaining another image


@dataclass(frozen=True)
class Explained:
    png: bytes
    label: str
    name: str
    probability: float
    rank: int  # the class's rank among the image's probabilities (1: the top class)
    method: str
    version: str  # of the model explained

    def headers(self) -> dict[str, str]:
        from urllib.parse import quote

        return {"X-Class-Label": quote(self.label), "X-Class-Name": quote(self.name),
                "X-Class-Probability": f"{self.probability:.6f}", "X-Class-Rank": str(self.rank),
                "X-Explain-Method": self.method, "Cache-Control": "no-store"}


class Explainer:
    """One worker's explanations: a private copy of the model (per version), used one request at a time."""

    def __init__(self) -> None:
        self.turn = threading.Lock()  # held while an explanation runs
        self._copy: tuple[str, torch.nn.Module] | None = None  # (model version, its copy)

    @property
    def copied(self) -> torch.nn.Module | None:
        """The private copy of the model explained last (None before the first explanation)."""
        return self._copy[1] if self._copy is not None else None

    def explain(self, model: ServedModel, image: torch.Tensor, target: str | None, method: str,
                timeout: float) -> Explained:
        """The picture for ``image`` (one preprocessed image) and the class ``target`` (a label or
        a name; None: the top class) by ``method`` (one of EXPLAIN_METHODS), or HttpError: 400 (an
        unknown class), 501 (an exported model, or no captum on the server), 503 (still busy
        after ``timeout`` seconds)."""
        if model.backend != "torch":
            raise HttpError(501, "explanations need the model's gradients, which an exported (ONNX, OpenVINO) model does not "
                                 "have: serve the .pt checkpoint to explain")
        try:
            require_extra("explain", "captum")
        except CnnkitError as exc:
            raise HttpError(501, f"this server cannot explain: {exc}") from None
        predictor = model.predictor
        try:
            index = predictor.class_index(target) if target is not None else None
        except ConfigError as exc:
            raise HttpError(400, f"class {exc}") from None
        probs = predictor.probabilities(image[None])[0]
        order = np.argsort(-probs, kind="stable").tolist()
        chosen = order[0] if index is None else index
        if not self.turn.acquire(timeout=max(timeout, 0.0)):
            raise HttpError(503, "busy: this worker is explaining another image; retry after the Retry-After seconds",
                            headers={"Retry-After": str(BUSY_RETRY_S)})
        try:
            heat = self._mapper(model, method).maps(image[None], [chosen])[0]
        finally:
            self.turn.release()
        return self._picture(model, image, heat, chosen, float(probs[chosen]), order.index(chosen) + 1, method)

    def _mapper(self, model: ServedModel, method: str) -> HeatMapper:
        if self._copy is None or self._copy[0] != model.version:
            self._copy = None  # (the old copy's memory goes before the new one is made)
            self._copy = (model.version, copy.deepcopy(model.predictor.model))
        return HeatMapper(self._copy[1], model.checkpoint.arch, method)

    @staticmethod
    def _picture(model: ServedModel, image: torch.Tensor, heat: torch.Tensor, index: int, probability: float,
                 rank: int, method: str) -> Explained:
        from .. import plots  # (matplotlib: there wherever captum is)

        label = model.classes[index]
        name = model.predictor.names.get(label, label)
        picture = plots.explanation_picture(model_view(image, model.checkpoint.preprocess), heat.numpy(),
                                            caption(label, name, probability, method))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return Explained(buffer.getvalue(), label, name, probability, rank, method, model.version)
