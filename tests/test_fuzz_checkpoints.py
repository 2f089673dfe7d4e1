"""Fuzzing checkpoint loading: truncated, bit-flipped, wrongly typed, oversized, malicious and
not-a-checkpoint files, through cnnkit.models.checkpoint and through `cnnkit predict` / `cnnkit info`.

The property: a valid checkpoint, or a one-line CheckpointError (exit code 4 on the command
line); never another exception, never code run from the file, never a hang or a huge allocation.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import event, given, settings  # noqa: E402
from hypothesis import strategies as st

from cnnkit.cli import main  # noqa: E402
from cnnkit.config import PreprocessConfig  # noqa: E402
from cnnkit.errors import CheckpointError  # noqa: E402
from cnnkit.models.build import build_model  # noqa: E402
from cnnkit.models.checkpoint import (  # noqa: E402
    FORMAT_VERSION,
    Checkpoint,
    describe,
    load_checkpoint,
)

from deploy_helpers import CLASSES, NAMES  # noqa: E402
from fuzz_helpers import fuzz_budget, hard_timeout, memory_cap  # noqa: E402
from helpers import MaliciousPickle, assert_one_line_error, run_cli  # noqa: E402

ARCH = "shufflenet_v2_x0_5"  # the smallest backbone cnnkit supports: a ~1.5 MB checkpoint


def _checkpoint(**changes) -> Checkpoint:
    torch.manual_seed(0)
    model, head = build_model(ARCH, len(CLASSES), "none", hidden_units=8)
    ckpt = Checkpoint(
        arch=ARCH, head=head, state_dict={k: v.clone() for k, v in model.state_dict().items()},
        classes=list(CLASSES), preprocess=PreprocessConfig(image_size=32, resize_size=36),
        class_names=dict(NAMES), summary={"epochs": 1},
    )
    for key, value in changes.items():
        setattr(ckpt, key, value)
    return ckpt


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt-fuzz")


@pytest.fixture(scope="module")
def valid(folder) -> Path:
    path = folder / "valid.pt"
    _checkpoint().save(path)
    return path


@pytest.fixture(scope="module")
def image(folder) -> Path:
    path = folder / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def loads_or_refuses(path: Path) -> str:
    """The property for one file: "ok" (it loads, its model builds, describe works) or "refused"
    (a one-line CheckpointError). Anything else, or more than 30 s, fails."""
    with hard_timeout(30), memory_cap(512 << 20):
        try:
            ckpt = load_checkpoint(path)
            ckpt.build_model()
            describe(path)
        except CheckpointError as exc:
            assert str(exc) and "\n" not in str(exc), repr(str(exc))
            return "refused"
    return "ok"


def test_the_valid_checkpoint_loads(valid):
    assert loads_or_refuses(valid) == "ok"


# --- truncation and mutation ---------------------------------------------------------------------


def test_truncation_at_many_offsets_is_refused(valid, folder):
    data = valid.read_bytes()
    size = len(data)
    offsets = sorted({*range(0, 9), *np.linspace(9, size - 1, 64, dtype=int).tolist(), *range(size - 40, size)})
    path = folder / "cut.pt"
    for offset in offsets:
        path.write_bytes(data[:offset])
        assert loads_or_refuses(path) == "refused", offset
    assert len(offsets) > 100


def _regions(data: bytes, path: Path) -> list[tuple[int, int]]:
    """Byte ranges where a parser makes decisions: each entry's local header, the pickle
    (data.pkl, the small version records) and the central directory; plus the whole file."""
    regions = [(0, len(data))]
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        for info in infos:
            start = info.header_offset
            body = start + 30 + len(info.filename.encode()) + len(info.extra)
            regions.append((start, body))
            if info.filename.endswith("data.pkl") or info.file_size < 4096:  # the pickle, version...: not storages
                regions.append((body, body + info.compress_size))
        central = max(i.header_offset + 30 + len(i.filename.encode()) + len(i.extra) + i.compress_size for i in infos)
        regions.append((central, len(data)))
    return [(a, b) for a, b in regions if b > a]


@st.composite
def mutation(draw, data: bytes, regions: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        start, end = draw(st.sampled_from(regions))
        offset = draw(st.integers(start, end - 1))
        kind = draw(st.sampled_from(["flip", "byte", "delete", "insert"]))
        if kind == "flip":
            out[offset] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            out[offset] = draw(st.integers(0, 255))
        elif kind == "delete":
            del out[offset:offset + draw(st.integers(1, 16))]
        else:
            out[offset:offset] = draw(st.binary(min_size=1, max_size=16))
    return bytes(out)


@pytest.fixture(scope="module")
def mutation_source(valid):
    data = valid.read_bytes()
    return data, _regions(data, valid)


@settings(max_examples=fuzz_budget(3))
@given(data=st.data())
def test_mutated_checkpoints_load_or_are_refused_cleanly(folder, mutation_source, data):
    original, regions = mutation_source
    mutated = data.draw(mutation(original, regions))
    path = folder / "mutant.pt"
    path.write_bytes(mutated)
    event(loads_or_refuses(path))


# --- hand-made payloads: versions, types, shapes, sizes --------------------------------------------


@pytest.mark.parametrize("version", ["1", None, 0, -3, 1.5, True, [1]], ids=repr)
def test_invalid_format_version_is_refused_as_damaged(folder, version):
    path = folder / "badversion.pt"
    payload = _checkpoint().to_dict()
    payload["format_version"] = version
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="invalid checkpoint format version") as info:
        load_checkpoint(path)
    assert "upgrade" not in str(info.value)


def _payload(**changes):
    payload = _checkpoint().to_dict()
    payload.update(changes)
    if "state_dict" in changes:  # as a file from before weights checksums: the checks behind it run
        del payload["weights_sha256"]
    return payload


def _other_arch_state():
    model, _ = build_model("mobilenet_v3_small", len(CLASSES), "none", hidden_units=8)
    return model.state_dict()


def _five_class_state():
    model, _ = build_model(ARCH, 5, "none", hidden_units=8)
    return model.state_dict()


BAD_PAYLOADS = {
    # shapes and architectures that do not match
    "state-dict-of-5-classes": (lambda: _payload(state_dict=_five_class_state()), "do not fit"),
    "state-dict-of-another-arch": (lambda: _payload(state_dict=_other_arch_state()), "do not fit"),
    "state-dict-missing-a-layer": (lambda: _payload(state_dict={k: v for i, (k, v) in enumerate(_checkpoint().state_dict.items()) if i}), "do not fit"),
    "unknown-arch": (lambda: _payload(arch="resnet9000"), "architecture .* do not have: .resnet9000"),
    "head-of-a-billion-units": (lambda: _payload(head={**_checkpoint().head.to_dict(), "hidden_units": 10**9}), "do not fit"),
    "head-with-negative-classes": (lambda: _payload(head={**_checkpoint().head.to_dict(), "num_classes": -4}), "head of -4 outputs"),
    "classes-not-matching-the-head": (lambda: _payload(classes=["cat", "dog"]), "2 classes"),
    # wrong types
    "state-dict-with-a-number": (lambda: _payload(state_dict={**_checkpoint().state_dict, "fc.extra": 3}), "incomplete or damaged"),
    "state-dict-is-a-list": (lambda: _payload(state_dict=[1, 2, 3]), "incomplete or damaged"),
    "head-is-a-list": (lambda: _payload(head=[1, 2]), "incomplete or damaged"),
    "head-is-a-string": (lambda: _payload(head="fc"), "incomplete or damaged"),
    "preprocess-is-a-list": (lambda: _payload(preprocess=[224, 256]), "incomplete or damaged"),
    "preprocess-size-is-text": (lambda: _payload(preprocess={"image_size": "big"}), "incomplete or damaged"),
    "classes-is-a-number": (lambda: _payload(classes=3), "incomplete or damaged"),
    "class-names-is-a-list": (lambda: _payload(class_names=["a", "b"]), "incomplete or damaged"),
    "temperature-is-text": (lambda: _payload(calibration={"temperature": "hot"}), "incomplete or damaged"),
    "payload-is-a-list": (lambda: [1, 2, 3], "not a cnnkit checkpoint"),
    "payload-is-a-tensor": (lambda: torch.zeros(3), "not a cnnkit checkpoint"),
}


@pytest.mark.parametrize("kind", sorted(BAD_PAYLOADS))
def test_bad_payload_is_refused_with_a_checkpoint_error(folder, kind):
    build, fragment = BAD_PAYLOADS[kind]
    path = folder / f"{kind}.pt"
    torch.save(build(), path)
    with hard_timeout(30), memory_cap(256 << 20):  # a billion-unit head would need 2 GB and more
        with pytest.raises(CheckpointError, match=fragment) as info:
            load_checkpoint(path).build_model()
    assert "\n" not in str(info.value)


# --- not checkpoints at all ------------------------------------------------------------------------


def _not_checkpoints(folder: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir(exist_ok=True)
    files: dict[str, tuple[Path, str]] = {}
    empty = folder / "empty.pt"
    empty.write_bytes(b"")
    files["empty"] = (empty, "not a cnnkit checkpoint")
    text = folder / "notes.pt"
    text.write_text("PK but not really\n")
    files["text"] = (text, "not a cnnkit checkpoint")
    plain_zip = folder / "photos.pt"
    with zipfile.ZipFile(plain_zip, "w") as archive:
        archive.writestr("hello.txt", "not a torch file")
    files["zip-not-torch"] = (plain_zip, "not a cnnkit checkpoint")
    state = folder / "weights.pth"
    torch.save(_checkpoint().state_dict, state)  # a bare state_dict, as torchvision ships
    files["bare-state-dict"] = (state, "not a cnnkit checkpoint")
    directory = folder / "run.pt"
    directory.mkdir(exist_ok=True)
    files["directory"] = (directory, "folder")
    if hasattr(os, "mkfifo"):
        fifo = folder / "fifo.pt"
        if not fifo.exists():
            os.mkfifo(fifo)
        files["fifo"] = (fifo, "not a regular file")
    return files


def test_files_that_are_not_checkpoints_are_refused_without_hanging(folder):
    for kind, (path, fragment) in _not_checkpoints(folder / "not").items():
        with hard_timeout(30):
            with pytest.raises(CheckpointError, match=fragment) as info:
                load_checkpoint(path)
        assert "\n" not in str(info.value), kind


# --- the command line: exit code 4 and one line ----------------------------------------------------


def _bad_checkpoints(folder: Path) -> dict[str, Path]:
    files = {kind: path for kind, (path, _) in _not_checkpoints(folder / "cli").items()}
    data = (folder / "valid.pt").read_bytes()
    files["truncated"] = folder / "cli" / "truncated.pt"
    files["truncated"].write_bytes(data[: len(data) // 3])
    for kind in ("state-dict-of-5-classes", "head-of-a-billion-units", "state-dict-with-a-number", "preprocess-is-a-list"):
        files[kind] = folder / "cli" / f"{kind}.pt"
        torch.save(BAD_PAYLOADS[kind][0](), files[kind])
    files["future"] = folder / "cli" / "future.pt"
    torch.save(_payload(format_version=FORMAT_VERSION + 1), files["future"])
    files["evil"] = folder / "cli" / "evil.pt"
    torch.save(_payload(summary={"x": MaliciousPickle(folder / "cli" / "pwned", "system")}), files["evil"])
    return files


@pytest.fixture(scope="module")
def bad_checkpoints(folder, valid):
    return _bad_checkpoints(folder)


BAD_KINDS = ["empty", "text", "zip-not-torch", "bare-state-dict", "directory", "fifo", "truncated",
             "state-dict-of-5-classes", "head-of-a-billion-units", "state-dict-with-a-number",
             "preprocess-is-a-list", "future", "evil"]


INFO_DESCRIBES = {  # bad for predict, yet readable metadata: what `cnnkit info` shows of them
    "state-dict-of-5-classes": "-> 3 classes",  # the head as stored; the weights are for 5
    "head-of-a-billion-units": "1024 -> 1000000000 hidden",
}


@pytest.mark.parametrize("command", ["predict", "info"])
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_cli_refuses_a_bad_checkpoint_with_exit_4_and_one_line(bad_checkpoints, image, folder, command, kind):
    if kind not in bad_checkpoints:
        pytest.skip(f"{kind} cannot be made on this platform")
    path = bad_checkpoints[kind]
    args = (["predict", str(image), "-c", str(path), "--device", "cpu", "--workers", "0"] if command == "predict"
            else ["info", str(path)])
    with hard_timeout(60), memory_cap(1 << 30):
        result = CliRunner().invoke(main, args, prog_name="cnnkit")
    if command == "info" and kind in INFO_DESCRIBES:
        # info reads metadata without building the model (under the 1 GiB cap: nothing is
        # allocated): it describes the file as stored, and the mismatch is predict's to find
        assert result.exit_code == 0, (result.exit_code, result.stderr, result.exception)
        assert result.stderr == "" and INFO_DESCRIBES[kind] in result.stdout, result.stdout
        return
    assert result.exit_code == 4, (result.exit_code, result.stderr, result.exception)
    assert_one_line_error(result.stderr)
    assert result.stdout == ""
    assert not (folder / "cli" / "pwned").exists()


@pytest.mark.parametrize("command", ["predict", "info"])
def test_malicious_checkpoint_end_to_end_in_a_subprocess(bad_checkpoints, image, folder, cli_env, command):
    """As a user runs it: a real process, which must not run the payload."""
    path = bad_checkpoints["evil"]
    args = ["predict", str(image), "-c", str(path), "--device", "cpu"] if command == "predict" else ["info", str(path)]
    result = run_cli(args, cli_env, timeout=120)
    assert result.returncode == 4, result.stderr
    assert_one_line_error(result.stderr, "arbitrary Python objects", str(path))
    assert result.stdout == ""
    assert not (folder / "cli" / "pwned").exists()


def test_a_flipped_bit_in_the_weights_is_refused_by_the_checksum(folder):
    """torch.load does not verify the zip's CRC-32: without the checksum this loaded silently."""
    payload = _checkpoint().to_dict()
    key = next(k for k, t in payload["state_dict"].items() if t.is_floating_point() and t.numel() > 1)
    flipped = payload["state_dict"][key].clone()
    flipped.view(-1).view(torch.int32)[0] ^= 1 << 3
    payload["state_dict"] = {**payload["state_dict"], key: flipped}
    path = folder / "flipped.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not match the checksum") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    del payload["weights_sha256"]  # a file from before checksums loads as it always did
    torch.save(payload, path)
    assert torch.equal(load_checkpoint(path).state_dict[key], flipped)
