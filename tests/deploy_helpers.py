"""Helpers for the serving and export tests: a tiny checkpoint, image bytes, HTTP and multipart."""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

CLASSES = ["cat", "dog", "fox"]
NAMES = {"cat": "Cat", "dog": "Dog", "fox": "Red fox"}
IMAGE_SIZE, RESIZE_SIZE = 64, 72


def random_image(seed: int, size: tuple[int, int] = (80, 64), bright: bool = False) -> Image.Image:
    """A noisy RGB image (``size`` is PIL's (width, height))."""
    rng = np.random.default_rng(seed)
    low = 150 if bright else 0
    return Image.fromarray(rng.integers(low, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def image_bytes(seed: int = 0, fmt: str = "PNG", size: tuple[int, int] = (80, 64)) -> bytes:
    buffer = io.BytesIO()
    random_image(seed, size).save(buffer, format=fmt)
    return buffer.getvalue()


def make_checkpoint(path: Path, reference: bool = True, temperature: float | None = None, unknown: bool = False) -> Path:
    """A resnet18 (weights none, seeded) for 3 classes on 64 px crops, with names and drift stats;
    ``unknown`` adds open-set statistics and an unknown threshold (answers then say "unknown")."""
    from cnnkit.config import PreprocessConfig
    from cnnkit.data.transforms import build_transforms
    from cnnkit.drift import reference_statistics
    from cnnkit.models.build import build_model
    from cnnkit.models.checkpoint import Checkpoint, library_versions

    torch.manual_seed(0)
    model, head = build_model("resnet18", len(CLASSES), "none", hidden_units=16)
    model.eval()
    preprocess = PreprocessConfig(image_size=IMAGE_SIZE, resize_size=RESIZE_SIZE)
    stats = None
    if reference:
        transform = build_transforms(preprocess, train=False)
        batch = torch.stack([transform(random_image(1000 + i)) for i in range(12)])
        stats = reference_statistics(model, [(batch, torch.zeros(12), [None] * 12)])
    ckpt = Checkpoint(
        arch="resnet18",
        head=head,
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        classes=list(CLASSES),
        preprocess=preprocess,
        class_names=dict(NAMES),
        summary={"epochs": 1, "best_val_acc": 0.5},
        versions=library_versions(),
        reference_stats=stats,
    )
    if temperature is not None:
        ckpt.calibration = {"temperature": temperature}
    if unknown:
        from cnnkit.models.openset import fit_open_set

        transform = build_transforms(preprocess, train=False)
        batch = torch.stack([transform(random_image(2000 + i)) for i in range(12)])
        loader = [(batch, torch.arange(12) % len(CLASSES), [None] * 12)]
        ckpt.open_set = fit_open_set(model, "resnet18", loader, loader, len(CLASSES))
        ckpt.calibration.update({"abstain_threshold": 0.3, "unknown_threshold": 0.0})
    ckpt.save(path)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def multipart(files: list[tuple[str, str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body from ``(field, filename, content)`` files and text fields."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for field, filename, content in files:
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def http(base: str, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
         headers: dict[str, str] | None = None, timeout: float = 60) -> Response:
    """One request to the server at ``base``; 4xx and 5xx are returned, not raised."""
    request = urllib.request.Request(base + path, data=body, method=method, headers=dict(headers or {}))
    if content_type is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return Response(answer.status, dict(answer.headers), answer.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, dict(error.headers), error.read())


def post_images(base: str, images: list[bytes], query: str = "", fields: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> Response:
    body, content_type = multipart([("image", f"img{i}.png", data) for i, data in enumerate(images)], fields)
    return http(base, "POST", "/predict" + query, body, content_type, headers)


def post_json(base: str, payload: Any, query: str = "") -> Response:
    return http(base, "POST", "/predict" + query, json.dumps(payload).encode(), "application/json")


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of a Prometheus text exposition."""
    from cnnkit.serve import iter_metric_samples

    return {(name, tuple(sorted(labels.items()))): value for name, labels, value in iter_metric_samples(text)}


def metric(values: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that have ``labels`` (and any others: by model, say)."""
    wanted = set(labels.items())
    return sum(value for (sample, sample_labels), value in values.items() if sample == name and wanted <= set(sample_labels))
