"""``cnnkit explain``: Grad-CAM heat maps of a checkpoint's top classes (or a given one) over
each image, as PNG overlays.

The overlay is drawn on the image as the model saw it: resized and centre-cropped by the
checkpoint's eval preprocessing (``build_transforms``), so the map lines up with the pixels the
model used; what the crop cut off is not shown. One PNG per image and class,
``<image-stem>__<rank>_<label>.png``, where rank is the class's rank among the image's
probabilities (1: the top class).
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import ExplainConfig
from .data.folders import ImageDataset, expand_inputs
from .data.transforms import model_view
from .errors import ConfigError, OutputError, require_extra
from .inference.cam import HeatMapper, caption
from .inference.predictor import Predictor
from .models.exported import is_exported_model
from .runtime import prepare_output_dir

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Explanation:
    """One picture written (or, with ``error``, an image that could not be explained)."""

    path: str
    rank: int = 0
    label: str = ""
    name: str = ""
    probability: float = 0.0
    file: str = ""
    error: str | None = None


@dataclass
class ExplainResult:
    rows: list[Explanation]

    @property
    def images(self) -> int:
        return len({row.path for row in self.rows})

    @property
    def failed(self) -> int:
        return sum(row.error is not None for row in self.rows)


def explain(cfg: ExplainConfig) -> ExplainResult:
    """Write a heat-map overlay for each image of ``cfg.inputs`` and each class asked for."""
    if is_exported_model(cfg.checkpoint):
        raise ConfigError(
            "Grad-CAM needs the torch model and its gradients, which an export (ONNX, OpenVINO) does not have: "
            "explain the .pt checkpoint it was exported from"
        )
    require_extra("explain", "captum")
    paths = list(expand_inputs(cfg.inputs))
    if not paths:
        log.warning("no images to explain")
    stems = _check_output(paths, cfg.output, cfg.force)
    predictor = Predictor(cfg.checkpoint, cfg.device, cfg.category_names, tta="none")  # (the heat map's one view)
    mapper = HeatMapper(predictor.model, predictor.checkpoint.arch, cfg.method)
    target = _target_index(predictor, cfg.target) if cfg.target is not None else None
    top_k = predictor.cap_top_k(cfg.top_k)
    images = ImageDataset(paths, predictor.transform, max_pixels=predictor.checkpoint.preprocess.max_pixels)
    rows: list[Explanation] = []
    for index, (path, stem) in enumerate(zip(paths, stems)):
        tensor, _, error = images[index]
        if error is not None:
            log.warning("cannot explain %s: %s", path, error[1])
            rows.append(Explanation(path, error=error[1]))
            continue
        probs = predictor.probabilities(tensor[None])[0]
        order = np.argsort(-probs, kind="stable").tolist()
        chosen = [target] if target is not None else order[:top_k]
        heat = mapper.maps(tensor[None].expand(len(chosen), -1, -1, -1), chosen)
        view = model_view(tensor, predictor.checkpoint.preprocess)
        for class_index, class_heat in zip(chosen, heat):
            row = _explanation(predictor, path, order.index(class_index) + 1, class_index, float(probs[class_index]),
                               os.path.join(cfg.output, stem))
            _write(row, view, class_heat, cfg.method)
            rows.append(row)
    return ExplainResult(rows)


def _check_output(paths: list[str], folder: str, force: bool) -> list[str]:
    """The stem of each image's pictures; refuses stems two images share, and (without
    ``force``) pictures of these images already in ``folder``, which is created."""
    stems = [Path(path).stem or "image" for path in paths]
    seen: dict[str, str] = {}
    for path, stem in zip(paths, stems):
        if stem in seen and seen[stem] != path:
            raise ConfigError(f"{seen[stem]} and {path} would write pictures of the same name ({stem}__*.png): "
                              "explain them in separate runs or with different --output folders")
        seen[stem] = path
    found = [name for stem in seen for name in glob.glob(f"{glob.escape(stem)}__*.png", root_dir=folder)]
    prepare_output_dir(folder, sorted(found), force)
    return stems


def _target_index(predictor: Predictor, target: str) -> int:
    try:
        return predictor.class_index(target)
    except ConfigError as exc:
        raise ConfigError(f"--target {exc}") from None


def _explanation(predictor: Predictor, path: str, rank: int, index: int, probability: float,
                 prefix: str) -> Explanation:
    label = predictor.classes[index]
    return Explanation(path, rank, label, predictor.names.get(label, label), probability,
                       f"{prefix}__{rank}_{label}.png")


def _write(row: Explanation, view: Image.Image, heat: torch.Tensor, method: str) -> None:
    from . import plots

    try:
        plots.explanation_png(view, heat.numpy(), caption(row.label, row.name, row.probability, method), row.file)
    except OSError as exc:
        raise OutputError(f"cannot write {row.file}: {exc.strerror or exc}") from None


def format_table(result: ExplainResult) -> str:
    """The terminal table: image, class, probability, file (or the reason an image failed)."""
    header = ("image", "class", "probability", "file")
    body = [
        (row.path, f"{row.rank}. {row.name}" + (f" ({row.label})" if row.name != row.label else ""),
         f"{row.probability:.1%}", row.file) if row.error is None else (row.path, "", "", f"error: {row.error}")
        for row in result.rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(3)]
    return "\n".join(
        "  ".join([line[0].ljust(widths[0]), line[1].ljust(widths[1]), line[2].rjust(widths[2]), line[3]]).rstrip()
        for line in [header, *body]
    )
