"""Exported model files (ONNX, OpenVINO IR, TorchScript): the metadata cnnkit writes into them
and reads back.

Metadata travels with the file, so an export is as self-describing as a checkpoint: class labels
and names, preprocessing, arch, training summary, calibration, drift reference and open-set statistics, as
JSON values under ``cnnkit.*`` keys of the ONNX ``metadata_props``, under ``<rt_info><cnnkit>`` of
an OpenVINO IR's ``.xml`` (one element per key, the JSON in its ``value``), or in the TorchScript
extra file ``cnnkit.json``. :mod:`cnnkit.export` writes them; inference and serving read them.

Reading an ONNX or OpenVINO export's metadata (:func:`export_info`) never imports torch: scoring an
export runs on its own runtime, and torch's import is seconds of every short ``cnnkit predict``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ..config import PreprocessConfig
from ..errors import CheckpointError, first_line, require_extra

if TYPE_CHECKING:
    import torch

    from .checkpoint import Checkpoint

EXPORT_FORMAT = "cnnkit-export"
EXPORT_FORMAT_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "input", "probabilities"
TORCHSCRIPT_METADATA = "cnnkit.json"  # the TorchScript extra file holding the metadata
OPENVINO_RT_INFO = "cnnkit"  # the IR's rt_info section holding the metadata
# The extra, and its modules, that runs each format of export scored by a runtime backend.
RUNTIME_EXTRAS = {"onnx": ("export", ("onnx", "onnxruntime")), "openvino": ("openvino", ("openvino",))}


def is_onnx_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names an exported ONNX model (by its extension)."""
    return os.fspath(path).lower().endswith(".onnx")


def is_openvino_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names an OpenVINO IR (its ``.xml``; the weights are in the ``.bin`` beside it)."""
    return os.fspath(path).lower().endswith(".xml")


def export_format(path: str | os.PathLike[str]) -> str | None:
    """``onnx``, ``openvino`` or ``torchscript`` for an exported model's file name, else None (a checkpoint)."""
    name = os.fspath(path).lower()
    if is_onnx_file(name):
        return "onnx"
    if is_openvino_file(name):
        return "openvino"
    return "torchscript" if name.endswith(".torchscript.pt") else None


def is_exported_model(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an export that a runtime backend scores in place of torch (ONNX, OpenVINO)."""
    return export_format(path) in RUNTIME_EXTRAS


def require_runtime(path: str | os.PathLike[str]) -> None:
    """A one-line ConfigError when the extra that runs the export ``path`` is not installed."""
    extra, modules = RUNTIME_EXTRAS[export_format(path)]
    require_extra(extra, *modules)


def ir_weights(path: str | os.PathLike[str]) -> str:
    """The ``.bin`` file holding the weights of the OpenVINO IR ``path`` (its ``.xml``)."""
    return os.path.splitext(os.fspath(path))[0] + ".bin"


def model_version(path: str | os.PathLike[str]) -> str:
    """A model file's identity: ``sha256:`` and the first 16 hex digits of its SHA-256 (of an
    OpenVINO IR: of its ``.xml`` then its ``.bin``, since the weights are there)."""
    digest = hashlib.sha256()
    files = [path, ir_weights(path)] if is_openvino_file(path) and os.path.isfile(ir_weights(path)) else [path]
    for name in files:
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def export_metadata(ckpt: Checkpoint, source_version: str | None = None) -> dict[str, Any]:
    """Everything but the weights that a runtime needs to use the exported model."""
    from .openset import open_set_to_json

    pre = ckpt.preprocess
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "arch": ckpt.arch,
        "head": ckpt.head.to_dict(),
        "classes": list(ckpt.classes),
        "class_names": {c: ckpt.name_of(c) for c in ckpt.classes},
        "preprocess": pre.to_dict(),
        "input": (
            f"{INPUT_NAME}: float32 [batch, 3, {pre.image_size}, {pre.image_size}], RGB; resize the short side "
            f"to {pre.resize_size} ({pre.interpolation}), centre-crop {pre.image_size}, scale to [0, 1], "
            f"subtract mean {list(pre.mean)}, divide by std {list(pre.std)}"
        ),
        "output": f"{OUTPUT_NAME}: float32 [batch, {len(ckpt.classes)}], softmax over the classes, in order",
        "calibration": dict(getattr(ckpt, "calibration", {}) or {}),
        "summary": dict(ckpt.summary),
        "versions": dict(ckpt.versions),
        "reference_stats": getattr(ckpt, "reference_stats", None),
        "open_set": open_set_to_json(getattr(ckpt, "open_set", None)),
        "source_model_version": source_version,
    }


@dataclass(frozen=True)
class ExportInfo:
    """What scoring needs of an export's metadata, read without torch: named as a checkpoint's fields."""

    classes: list[str]
    class_names: dict[str, str]
    preprocess: PreprocessConfig
    calibration: dict[str, Any]  # without the temperature, which is in the exported graph


def export_info(meta: Mapping[str, Any], source: str) -> ExportInfo:
    """The checked :class:`ExportInfo` of an export's metadata; CheckpointError for a file cnnkit
    did not export, a newer format, or incomplete metadata."""
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{source} is not a model exported by cnnkit export (no cnnkit metadata)")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > EXPORT_FORMAT_VERSION:
        raise CheckpointError(f"{source} was exported by a newer cnnkit (format {meta.get('format_version')}); upgrade cnnkit")
    try:
        return ExportInfo(list(meta["classes"]), dict(meta.get("class_names") or {}),
                          PreprocessConfig.from_dict(meta["preprocess"]),
                          {k: v for k, v in (meta.get("calibration") or {}).items() if k != "temperature"})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{source} has incomplete cnnkit metadata ({exc})") from None


def checkpoint_from_metadata(meta: Mapping[str, Any], source: str) -> Checkpoint:
    """A weightless :class:`Checkpoint` describing an exported model (for the server, ``cnnkit
    info``, evaluation), as :func:`export_info` plus arch, head, summary, drift and open-set statistics."""
    from .build import HeadSpec
    from .checkpoint import Checkpoint
    from .openset import open_set_from_json

    info = export_info(meta, source)
    try:
        ckpt = Checkpoint(
            arch=meta["arch"],
            head=HeadSpec.from_dict(meta["head"]),
            state_dict={},
            classes=info.classes,
            preprocess=info.preprocess,
            class_names=info.class_names,
            summary=dict(meta.get("summary") or {}),
            versions=dict(meta.get("versions") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source} has incomplete cnnkit metadata ({exc})") from None
    if hasattr(ckpt, "calibration"):
        ckpt.calibration = dict(info.calibration)
    ckpt.reference_stats = meta.get("reference_stats")
    ckpt.open_set = open_set_from_json(meta.get("open_set"))
    return ckpt


def onnx_props(meta: Mapping[str, Any]) -> dict[str, str]:
    return {f"cnnkit.{key}": json.dumps(value, ensure_ascii=False) for key, value in meta.items()}


def set_onnx_metadata(proto: Any, meta: Mapping[str, Any]) -> None:
    """Replace an ``onnx.ModelProto``'s ``metadata_props`` with ``meta`` (as :func:`onnx_props`)."""
    import onnx

    del proto.metadata_props[:]
    for key, value in onnx_props(meta).items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def parse_onnx_props(props: Mapping[str, str]) -> dict[str, Any]:
    meta = {}
    for key, value in props.items():
        if key.startswith("cnnkit."):
            try:
                meta[key[len("cnnkit."):]] = json.loads(value)
            except json.JSONDecodeError:
                continue
    return meta


def set_openvino_metadata(model: Any, meta: Mapping[str, Any]) -> None:
    """Write ``meta`` into an ``openvino.Model``'s rt_info (saved in the IR's ``.xml``)."""
    for key, value in meta.items():
        model.set_rt_info(json.dumps(value, ensure_ascii=False), [OPENVINO_RT_INFO, key])


def read_openvino_metadata(path: str) -> dict[str, Any]:
    """The cnnkit metadata of an OpenVINO IR, read from its ``.xml`` alone (no runtime, no weights)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable OpenVINO IR ({first_line(exc)})") from None
    section = root.find(f"rt_info/{OPENVINO_RT_INFO}")
    meta = {}
    for entry in section if section is not None else []:
        try:
            meta[entry.tag] = json.loads(entry.get("value", ""))
        except json.JSONDecodeError:
            continue
    return meta


def describe_model(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``cnnkit info`` shows of a checkpoint or of an exported model (ONNX, OpenVINO, TorchScript)."""
    from .checkpoint import describe, description_fields

    path = os.fspath(path)
    fmt = export_format(path)
    if fmt is None:
        return describe(path)
    meta = read_metadata(path)
    ckpt = checkpoint_from_metadata(meta, path)  # refuses files cnnkit did not export
    quantization = meta.get("quantization")
    return {
        **description_fields(ckpt, path),
        "export": {"format": fmt, "model_version": model_version(path),
                   "source_model_version": meta.get("source_model_version"),
                   "precision": "int8" if quantization else "float32"},
        "calibration": dict(meta.get("calibration") or {}),  # with the temperature, already in the graph
        "quantization": quantization,
    }


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The cnnkit metadata of an exported ONNX, OpenVINO or TorchScript file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"exported model not found: {path}")
    if is_openvino_file(path):
        return read_openvino_metadata(path)
    if is_onnx_file(path):
        require_extra("export", "onnx")
        import onnx

        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable ONNX model ({first_line(exc)})") from None
        return parse_onnx_props({p.key: p.value for p in model.metadata_props})
    extra = {TORCHSCRIPT_METADATA: ""}
    try:
        load_torchscript(path, extra)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable TorchScript model ({first_line(exc)})") from None
    return json.loads(extra[TORCHSCRIPT_METADATA] or "{}")


def load_torchscript(path: str, extra_files: dict[str, Any] | None = None) -> torch.jit.ScriptModule:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        module = torch.jit.load(path, map_location="cpu", _extra_files=extra_files or {})
    return module.eval()
