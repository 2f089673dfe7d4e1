"""One self-describing checkpoint file, saved atomically and loaded safely.

A checkpoint is a ``torch.save``'d dict of plain values and tensors only, so it loads with
``torch.load(weights_only=True)``: a file carrying arbitrary pickled objects is refused, never
executed. It holds everything ``predict`` needs (arch, head, weights, classes and names, the
preprocessing config) and, for resumable files (``last.pt``), the training state.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import platform
import re
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch
from torch import nn

from .. import __version__
from ..config import PreprocessConfig
from ..errors import CheckpointError, ConfigError, OutputError, first_line
from .build import HeadSpec, build_head, head_path, list_archs, model_from_spec

log = logging.getLogger(__name__)

FORMAT = "cnnkit-checkpoint"
FORMAT_VERSION = 1
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's container


@dataclass
class Checkpoint:
    arch: str
    head: HeadSpec
    state_dict: dict[str, torch.Tensor]
    classes: list[str]  # class labels (ImageFolder folder names), in output-index order
    preprocess: PreprocessConfig
    class_names: dict[str, str] = field(default_factory=dict)  # label → human-readable name
    train_config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # epochs, best val acc, data, seed...
    versions: dict[str, str] = field(default_factory=dict)
    training_state: dict[str, Any] | None = None  # optimizer, epoch...: only to resume training
    calibration: dict[str, Any] = field(default_factory=dict)  # temperature, abstain threshold
    # Validation-set statistics for drift monitoring (cnnkit.drift): plain lists and floats.
    reference_stats: dict[str, Any] | None = None
    # Training-set feature statistics for unknown detection (cnnkit.models.openset): floats and tensors.
    open_set: dict[str, Any] | None = None

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.classes)}

    def build_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The trained model, in eval mode, on ``device``."""
        self._check_fits()
        model = model_from_spec(self.arch, self.head)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            detail = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
            raise CheckpointError(f"checkpoint weights do not fit {self.arch}: {detail}") from None
        return model.to(device).eval()

    def _check_fits(self) -> None:
        """Build the model on the meta device (no memory) and compare its shapes with the weights,
        so that a damaged head spec (say a billion hidden units) is refused, not allocated."""
        if self.arch not in list_archs():
            raise CheckpointError(f"checkpoint is for an architecture this cnnkit and torchvision do not have: {self.arch!r}")
        try:
            shapes = _skeleton_state(self.arch, self.head)
        except (ConfigError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint describes a model cnnkit cannot build: {_first_sentence(exc)}") from None
        for key, expected in shapes.items():
            found = self.state_dict.get(key)
            if found is not None and found.shape != expected.shape:
                raise CheckpointError(
                    f"checkpoint weights do not fit {self.arch}: size mismatch for {key}: "
                    f"{tuple(found.shape)} in the checkpoint, {tuple(expected.shape)} in the model"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "arch": self.arch,
            "head": self.head.to_dict(),
            "state_dict": self.state_dict,
            "classes": list(self.classes),
            "class_names": dict(self.class_names),
            "preprocess": self.preprocess.to_dict(),
            "train_config": dict(self.train_config),
            "summary": dict(self.summary),
            "versions": dict(self.versions) or library_versions(),
            "training_state": self.training_state,
            "calibration": dict(self.calibration),
            "reference_stats": self.reference_stats,
            "open_set": self.open_set,
            "weights_sha256": weights_digest(self.state_dict),
        }

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any], source: str = "checkpoint") -> "Checkpoint":
        if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{source} is not a cnnkit checkpoint")
        version = payload.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CheckpointError(f"{source} has an invalid checkpoint format version ({version!r}): it is damaged")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source} has checkpoint format version {version}, newer than this cnnkit "
                f"{__version__} reads ({FORMAT_VERSION}); upgrade cnnkit"
            )
        try:
            ckpt = cls(
                arch=payload["arch"],
                head=HeadSpec.from_dict(payload["head"]),
                state_dict=dict(payload["state_dict"]),
                classes=list(payload["classes"]),
                preprocess=PreprocessConfig.from_dict(payload["preprocess"]),
                class_names=dict(payload.get("class_names") or {}),
                train_config=dict(payload.get("train_config") or {}),
                summary=dict(payload.get("summary") or {}),
                versions=dict(payload.get("versions") or {}),
                training_state=payload.get("training_state"),
                calibration=dict(payload.get("calibration") or {}),
                reference_stats=payload.get("reference_stats"),
                open_set=payload.get("open_set"),
            )
            ckpt._check_types(payload)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{source} is an incomplete or damaged cnnkit checkpoint ({exc})") from None
        # torch.load does not verify the zip's CRCs: a flipped bit in the weights would load
        # silently. Files written before the checksum existed have none, and load as before.
        expected = payload.get("weights_sha256")
        if expected is not None and expected != weights_digest(ckpt.state_dict):
            raise CheckpointError(
                f"{source} is damaged: its weights do not match the checksum saved with them "
                "(a flipped bit or a bad copy); use another copy of the file"
            )
        return ckpt

    def _check_types(self, payload: Mapping[str, Any]) -> None:
        """What the rest of cnnkit relies on (a hand-edited or damaged file may break it)."""
        if not isinstance(self.arch, str) or not isinstance(payload["classes"], (list, tuple)):
            raise TypeError("arch must be a string and classes a list")
        if not all(isinstance(t, torch.Tensor) for t in self.state_dict.values()):
            raise TypeError("state_dict holds values that are not tensors")
        if not all(isinstance(c, str) for c in self.classes) or len(self.classes) != self.head.num_classes:
            raise ValueError(f"{len(self.classes)} classes for a head of {self.head.num_classes} outputs")
        if self.open_set is not None and not isinstance(self.open_set, Mapping):
            raise TypeError("open_set must be a dict of statistics")
        if not 0 < self.temperature < float("inf"):
            raise ValueError(f"temperature {self.temperature} is not a positive number")

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_save(self.to_dict(), path)

    def detached(self) -> "Checkpoint":
        """A copy holding its own CPU tensors (weights, optimizer state...), not the live model's
        or optimizer's: it can be written while training goes on changing those."""
        return replace(self, state_dict=detached_copy(self.state_dict), training_state=detached_copy(self.training_state))

    def name_of(self, label: str) -> str:
        return self.class_names.get(label, label)

    @property
    def temperature(self) -> float:
        """Softmax temperature fitted by ``cnnkit evaluate --calibrate`` (1.0: uncalibrated)."""
        return float(self.calibration.get("temperature", 1.0))


def _skeleton_state(arch: str, head: HeadSpec) -> dict[str, torch.Tensor]:
    """The state of a model of ``arch`` with ``head``, as meta tensors (shapes, no memory)."""
    with torch.device("meta"):
        try:
            return model_from_spec(arch, head).state_dict()
        except NotImplementedError:
            # RegNet computes its stage widths from tensor values, which meta tensors do not have:
            # the head's shapes alone then (load_state_dict checks the backbone's, of a known size).
            return {f"{head_path(arch)}.{key}": value for key, value in build_head(head).state_dict().items()}


def library_versions() -> dict[str, str]:
    import torchvision

    return {
        "cnnkit": __version__,
        "torch": str(torch.__version__),  # a TorchVersion object would not load weights_only
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
    }


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``.

    A crash or kill mid-write leaves the previous file intact (and at worst a stray temporary).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        # torch.save's writer turns the OSError of a full disk into a RuntimeError ("unexpected
        # pos"): the OSError is its context.
        failure = next((e for e in (exc, exc.__cause__, exc.__context__) if isinstance(e, OSError)), None)
        if failure is not None and isinstance(exc, Exception):
            raise OutputError(f"cannot write {path}: {failure.strerror or failure}") from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load and validate a checkpoint onto the CPU, refusing anything but plain data."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint is a folder, not a file: {path}")
    if not stat.S_ISREG(os.stat(path).st_mode):  # reading a named pipe would wait forever
        raise CheckpointError(f"checkpoint is not a regular file (a pipe or device): {path}")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if magic != ZIP_MAGIC:
        raise CheckpointError(f"{path} is not a cnnkit checkpoint (not a file written by torch.save)")
    if not _has_pickle(path):
        raise CheckpointError(f"{path} is not a cnnkit checkpoint (a zip archive, but not one written by torch.save)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found:
            raise CheckpointError(
                f"refusing to load {path}: it contains arbitrary Python objects ({found.group(1)}), "
                "which could run code when loaded; cnnkit checkpoints hold only tensors and plain values"
            ) from None
        raise CheckpointError(f"{path} is not a cnnkit checkpoint, or it is corrupt (unreadable pickle)") from None
    except Exception as exc:  # zip, storage and pickle errors of a truncated or damaged file
        raise CheckpointError(
            f"{path} is truncated or corrupt ({_first_sentence(exc)})"
        ) from None
    return Checkpoint.from_dict(payload, source=path)


def _has_pickle(path: str) -> bool:
    """Whether a zip holds torch.save's ``<name>/data.pkl`` (True when it is too damaged to
    tell: torch.load then reports the damage)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return True


def _first_sentence(exc: BaseException) -> str:
    return first_line(exc).split(". ")[0]


def detached_copy(value: Any) -> Any:
    """``value`` with every tensor in its dicts, lists and tuples copied to the CPU (a copy even
    when it is there already); other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: detached_copy(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(detached_copy(item) for item in value)
    return value


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state_dict: every tensor's name, dtype, shape and bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's metadata (everything but the weights), for ``cnnkit info``."""
    ckpt = load_checkpoint(path)
    n_params = sum(t.numel() for t in ckpt.state_dict.values() if t.is_floating_point())
    return {
        **description_fields(ckpt, path),
        "format_version": FORMAT_VERSION,
        "parameters": n_params,
        "train_config": ckpt.train_config,
        "resumable": ckpt.training_state is not None,
    }


def description_fields(ckpt: Checkpoint, path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``cnnkit info`` shows of any model, checkpoint or export (:func:`format_description`)."""
    return {
        "path": os.fspath(path),
        "arch": ckpt.arch,
        "head": ckpt.head.to_dict(),
        "classes": [{"label": c, "name": ckpt.name_of(c)} for c in ckpt.classes],
        "preprocess": ckpt.preprocess.to_dict(),
        "summary": ckpt.summary,
        "versions": ckpt.versions,
        "calibration": dict(ckpt.calibration),
        "drift_reference": bool(ckpt.reference_stats),
        "open_set": bool(ckpt.open_set),
    }


def format_description(meta: dict[str, Any]) -> str:
    """:func:`describe`'s metadata as the lines ``cnnkit info`` prints."""
    summary = meta["summary"]
    pre = meta["preprocess"]
    head = meta["head"]
    export = meta.get("export")
    if export is None:
        lines = [
            f"checkpoint   {meta['path']} (format {meta['format_version']}{', resumable' if meta['resumable'] else ''})",
            f"arch         {meta['arch']}, {meta['parameters']:,} parameters",
        ]
    else:
        lines = [
            f"model        {meta['path']} ({export['format']}, {export['precision']}, {export['model_version']}; "
            f"exported from {export['source_model_version'] or 'an unknown checkpoint'})",
            f"arch         {meta['arch']}",
        ]
    lines += [
        f"head         {head['in_features']} -> {head['hidden_units'] or '-'} hidden (dropout {head['dropout']}) -> {head['num_classes']} classes",
        f"preprocess   resize {pre['resize_size']}, crop {pre['image_size']}, {pre['interpolation']}, mean {list(pre['mean'])}, std {list(pre['std'])}",
    ]
    if summary:
        lines.append(
            f"training     {summary.get('epochs')} epochs, best val acc {summary.get('best_val_acc', 0):.1%} "
            f"(epoch {summary.get('best_epoch')}), seed {summary.get('seed')}, weights {summary.get('weights')}"
        )
        lines.append(f"data         {summary.get('data_dir')} ({summary.get('validation')})")
    calibration = meta.get("calibration") or {}
    if calibration:
        lines.append("calibration  " + ", ".join(f"{k.replace('_', ' ')} {v:.4g}" if isinstance(v, float) else
                                                 f"{k.replace('_', ' ')} {v}" for k, v in calibration.items()))
    lines.append(f"drift ref    {'stored (cnnkit serve reports drift)' if meta.get('drift_reference') else 'none'}")
    lines.append(f"open set     {'stored (feature statistics for --abstain and evaluate --unknown)' if meta.get('open_set') else 'none'}")
    quantization = meta.get("quantization")
    if quantization:
        gate = quantization["gate"]
        reduce_range = f", reduce_range {quantization['reduce_range']}" if "reduce_range" in quantization else ""
        lines.append(f"int8         {quantization['method']}, {quantization['calibration_method']} calibration on "
                     f"{quantization['calibration_images']} images{reduce_range}")
        openvino = f", {gate['openvino_img_s']:.1f} OpenVINO" if gate.get("openvino_img_s") is not None else ""
        accuracy = (f"top-1 {gate['float_accuracy']:.2%} float -> {gate['int8_accuracy']:.2%} int8"
                    if gate["labelled"] else "unlabelled")
        lines.append(f"gate         {'passed' if gate['passed'] else 'FAILED (kept with --ignore-gate)'} on {gate['images']} "
                     f"held-out images: {accuracy}, agreement {gate['agreement']:.2%}, {gate['speedup']:.2f}x the "
                     f"faster float runtime ({gate['int8_img_s']:.1f} vs {gate['torch_img_s']:.1f} torch, "
                     f"{gate['onnx_img_s']:.1f} ONNX{openvino} img/s, batch {gate['batch_size']}, {gate['threads']} threads)")
    lines.append("versions     " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    lines.append(f"classes      {len(meta['classes'])}")
    lines += [f"  {c['label']:>12}  {c['name']}" for c in meta["classes"]]
    return "\n".join(lines)
