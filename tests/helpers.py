"""Plain helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

CLASSES = ("blue", "green", "red")  # sorted, as ImageFolder orders them
CHANNEL = {"red": 0, "green": 1, "blue": 2}
NAMES = {"blue": "Blue sky", "green": "Green leaf", "red": "Red rose"}
N_TRAIN, N_VALID, N_FLAT = 6, 2, 8
INITIAL_SEED = 20240601  # global torch seed set before runs that must start from the same weights


def colour_image(colour: str, rng: np.random.Generator, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A noisy image whose dominant channel is ``colour`` (``size`` is PIL's (width, height))."""
    width, height = size
    pixels = rng.integers(0, 80, (height, width, 3)).astype(np.uint8)
    pixels[..., CHANNEL[colour]] = rng.integers(170, 256, (height, width))
    return Image.fromarray(pixels, mode="RGB")


def write_class_images(folder: Path, colour: str, count: int, rng: np.random.Generator) -> list[Path]:
    """``count`` images of ``colour`` in ``folder``, alternating JPEG and PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        path = folder / f"{colour}_{i:02d}.{'jpg' if i % 2 == 0 else 'png'}"
        colour_image(colour, rng).save(path)
        written.append(path)
    return written


def make_split_folder(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for colour in CLASSES:
        write_class_images(root / "train" / colour, colour, N_TRAIN, rng)
        write_class_images(root / "valid" / colour, colour, N_VALID, rng)
    return root


def make_flat_folder(root: Path, per_class: int = N_FLAT, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    for colour in CLASSES:
        write_class_images(root / colour, colour, per_class, rng)
    return root


def tiny_train_config(data_dir: os.PathLike | str, save_dir: os.PathLike | str, **overrides: Any):
    """A TrainConfig small enough for a CPU test: resnet18 from scratch on 32 px crops, with the
    plain recipe (light augmentation only) unless ``recipe`` says otherwise."""
    from cnnkit.config import TrainConfig

    values: dict[str, Any] = dict(
        data_dir=str(data_dir),
        save_dir=str(save_dir),
        arch="resnet18",
        weights="none",
        hidden_units=32,
        epochs=3,
        batch_size=6,
        workers=0,
        image_size=32,
        resize_size=36,
        device="cpu",
        seed=0,
        progress=False,
        recipe="plain",
    )
    values.update(overrides)
    return TrainConfig(**values)


@dataclass
class TrainedRun:
    cfg: Any  # the TrainConfig
    result: Any  # the TrainResult
    save_dir: Path
    preprocess: dict[bool, Any]  # train flag -> the PreprocessConfig build_transforms got in training
    transforms: dict[bool, Callable]  # train flag -> the pipeline training actually used

    @property
    def best(self) -> Path:
        return self.save_dir / "best.pt"

    @property
    def last(self) -> Path:
        return self.save_dir / "last.pt"

    @property
    def metrics(self) -> Path:
        return self.save_dir / "metrics.jsonl"


def strip_timing(rows: list[dict]) -> list[dict]:
    """Metrics rows without the wall-clock fields, which differ between identical runs."""
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in rows]


def read_metrics(path: os.PathLike | str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def cnnkit_command(*args: Any) -> list[Any]:
    """The command line ``python -m cnnkit ARGS`` (bytes stay bytes, anything else a str)."""
    return [sys.executable, "-m", "cnnkit", *(a if isinstance(a, bytes) else str(a) for a in args)]


def run_cli(args: list[str], env: dict[str, str], stdin: str | None = None, timeout: float = 300):
    """Run ``python -m cnnkit ARGS`` as a user would; returns the CompletedProcess."""
    return subprocess.run(
        cnnkit_command(*args),
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def frameworks_imported_by(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``cnnkit ARGS`` as :func:`run_cli` does; also say which of torch and torchvision it imported."""
    code = ("import atexit, json, runpy, sys; atexit.register(lambda: print('IMPORTED', json.dumps("
            "[m for m in ('torch', 'torchvision') if m in sys.modules]), file=sys.stderr)); "
            "sys.argv = ['cnnkit', *sys.argv[1:]]; runpy.run_module('cnnkit', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    line = next(line for line in result.stderr.splitlines() if line.startswith("IMPORTED "))
    return result, json.loads(line.split(" ", 1)[1])


# Flags of `cnnkit train` matching tiny_train_config (epochs and save dir are given per test).
TINY_TRAIN_ARGS = [
    "--arch", "resnet18", "--weights", "none", "--hidden-units", "32", "--batch-size", "6",
    "--workers", "0", "--image-size", "32", "--resize-size", "36", "--device", "cpu", "--no-progress", "--recipe", "plain",
]


def assert_one_line_error(stderr: str, *fragments: str) -> str:
    """stderr ends with exactly one 'cnnkit: error: ...' line containing ``fragments``, and holds
    no traceback (log lines written before the error, such as the training set-up, may precede it)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("cnnkit: error: ")]
    assert len(errors) == 1 and lines and lines[-1] == errors[0], f"expected one final error line, got:\n{stderr}"
    assert not any(line.startswith((" ", "\t")) for line in lines), f"indented (traceback-like) lines:\n{stderr}"
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def write_corrupt_files(folder: Path) -> dict[str, Path]:
    """Files that look like images by name but cannot be decoded."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "garbage": folder / "garbage.jpg",
        "text": folder / "notes.png",
        "empty": folder / "empty.jpg",
        "truncated": folder / "truncated.jpg",
    }
    files["garbage"].write_bytes(bytes(range(256)) * 4)
    files["text"].write_text("this is not a picture\n", encoding="utf-8")
    files["empty"].write_bytes(b"")
    rng = np.random.default_rng(5)
    full = folder / "full.tmpjpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full, format="JPEG")
    data = full.read_bytes()
    full.unlink()
    files["truncated"].write_bytes(data[: len(data) // 2])
    return files


def interrupt_training_call(monkeypatch, n: int) -> list:
    """Make the n-th training pass (a run_epoch call with an optimizer) raise KeyboardInterrupt,
    as Ctrl-C would; returns the list of calls seen."""
    import cnnkit.training.loop as loop

    calls: list = []
    real = loop.run_epoch

    def run(model, loader, device, optimizer=None, *args, **kwargs):
        if optimizer is not None:
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
        return real(model, loader, device, optimizer, *args, **kwargs)

    monkeypatch.setattr(loop, "run_epoch", run)
    return calls


def as_ordinary_user(probe: list[str]) -> list[str]:
    """A command prefix under which file permissions apply: none for an ordinary user; for root
    (as in many containers), setpriv dropping the capabilities that let root read and write any
    file. ``probe`` is a command that permissions must make fail (reading a mode-000 file, say)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, which ignores file permissions, and setpriv is missing")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
    if subprocess.run([*prefix, *probe], capture_output=True).returncode == 0:
        pytest.skip("running as root, and dropping root's file-access capabilities is not allowed here")
    return prefix


def cli_subprocess_env(torch_home: os.PathLike | str) -> dict[str, str]:
    """Environment for ``python -m cnnkit`` subprocesses: an empty torch home, no debug
    tracebacks, and the same cnnkit as the tests, wherever they run from."""
    import cnnkit

    env = {k: v for k, v in os.environ.items() if k != "CNNKIT_DEBUG"}
    env["TORCH_HOME"] = str(torch_home)
    env["PYTHONUNBUFFERED"] = "1"
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(cnnkit.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


class MaliciousPickle:
    """Unpickled, it creates ``marker``: by ``os.system``, ``open``, ``eval`` or ``subprocess.Popen``
    (``how``). A safe loader refuses it and the marker never appears."""

    def __init__(self, marker: Path, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch '{self.marker}'",))
        if self.how == "open":
            return (open, (str(self.marker), "w"))
        if self.how == "eval":
            return (eval, (f"open({str(self.marker)!r}, 'w')",))
        return (subprocess.Popen, (["touch", str(self.marker)],))
