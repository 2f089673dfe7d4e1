"""Faults (issue 6): kill -9 during training, a full disk or unwritable folder, dying DataLoader workers.

Every fault hits a real ``python -m cnnkit`` process:

- SIGKILL before the first epoch finished, at a seeded-random time (in the default test no later
  than the end of the first epoch), while ``last.pt`` is being written (polled: the moment its
  temporary file appears, with nothing patched), half-way through a checkpoint write (a wrapper
  script stalls ``torch.save`` after writing half the bytes) and while a finished run completes
  ``best.pt`` (a wrapper stalls the drift statistics);
- a full disk: ``RLIMIT_FSIZE`` with SIGXFSZ ignored, so the kernel refuses writes past the size
  with EFBIG as a full disk refuses them with ENOSPC (checkpoints, metrics.jsonl, predict's
  --output), and ENOSPC from a patched output file in-process;
- a save dir that cannot be created or written;
- a DataLoader worker that dies while it decodes one image (SIGKILL, as the OOM killer kills, or
  an abrupt exit), in ``predict`` and in ``train``.

What must hold: checkpoints on disk always load, an error is one line with its documented exit
code, nothing half-written is left behind, and ``--resume`` reaches exactly what an uninterrupted
run reaches (metrics without timing, best.pt and last.pt: weights, optimizer, summary, drift
statistics). The wrapper scripts take arguments, never environment variables.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import cnnkit.inference.predict as predict_module
from cnnkit.config import PredictConfig
from cnnkit.errors import OutputError, WorkerError
from cnnkit.inference.predict import predict_to_output
from cnnkit.models.checkpoint import load_checkpoint

from helpers import (
    TINY_TRAIN_ARGS,
    as_ordinary_user,
    assert_one_line_error,
    cli_subprocess_env,
    cnnkit_command,
    read_metrics,
    strip_timing,
    tiny_train_config,
)

EPOCHS = 3
SEED = 5
RUN_FIELDS = {"data_dir", "epochs", "workers", "device", "save_dir", "resume", "force", "progress", "nproc"}
CHECKPOINT_TMP = (".best.pt.", ".last.pt.")  # atomic_save's temporaries: .NAME.XXXXXXXX.tmp
FINISHED = "the run had finished: the rest of the plan has nothing to hit"
SCORING = ["--top-k", "3", "--batch-size", "4", "--device", "cpu", "--no-progress"]

WRAPPER = '''\
"""python wrapper.py FAULT ARG MARKER CNNKIT-ARGS...: the cnnkit CLI with one fault injected."""
import hashlib, io, os, signal, sys, time

fault, arg, marker, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
import torch
import cnnkit.data.folders
import cnnkit.training.callbacks.checkpoints


def stall(note=""):  # tell the test where we are, then wait for its SIGKILL
    with open(marker + ".tmp", "w") as handle:  # whole or absent: the test kills us once it exists
        handle.write(note)
    os.replace(marker + ".tmp", marker)
    time.sleep(600)
    os._exit(99)


if fault == "stall-save":  # the ARG-th checkpoint write stops half-way, its bytes flushed
    real_save, calls = torch.save, [0]

    def save(obj, f, *a, **k):
        calls[0] += 1
        if isinstance(f, (str, os.PathLike)) or calls[0] < int(arg):
            return real_save(obj, f, *a, **k)
        buffer = io.BytesIO()
        real_save(obj, buffer, *a, **k)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        # the file this write replaces (.best.pt.XXXXXXXX.tmp -> best.pt), as it is now
        temporary = os.readlink(f"/proc/self/fd/{f.fileno()}")  # (atomic_save writes to an fd)
        target = os.path.join(os.path.dirname(temporary), os.path.basename(temporary)[1:].rsplit(".", 2)[0])
        stall(hashlib.sha256(open(target, "rb").read()).hexdigest() if os.path.exists(target) else "")

    torch.save = save
elif fault == "stall-finish":  # stop while the finished run adds its drift statistics to best.pt
    cnnkit.training.callbacks.checkpoints.reference_statistics = lambda *a, **k: stall()
elif fault in ("worker-kill", "worker-exit"):  # the worker decoding image ARG dies
    from torch.utils.data import get_worker_info

    victim, _, armed = arg.partition("|")  # armed: only once this file has content
    real_load = cnnkit.data.folders.load_image

    def load_image(path, *a, **k):
        if (get_worker_info() is not None and os.path.realpath(path) == os.path.realpath(victim)
                and (not armed or (os.path.exists(armed) and os.path.getsize(armed) > 0))):
            with open(marker, "w"):
                pass
            if fault == "worker-kill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(3)
        return real_load(path, *a, **k)

    cnnkit.data.folders.load_image = load_image
else:
    sys.exit(f"unknown fault {fault}")

from cnnkit.cli import main

main(args, prog_name="cnnkit")
'''


# --- processes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """As conftest's cli_env, for module-scoped runs."""
    return cli_subprocess_env(tmp_path_factory.mktemp("torch-home"))


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wrapper") / "fault_wrapper.py"
    path.write_text(WRAPPER, encoding="utf-8")
    return path


@dataclass
class Outcome:
    killed: bool
    returncode: int
    stderr: str
    seconds: float


def run_until(
    command: list[str], env: dict[str, str], log: Path, kill_when: Callable[[], bool] | None = None,
    timeout: float = 300,
) -> Outcome:
    """Run ``command``, polling ``kill_when`` every millisecond; SIGKILL the process once it holds.
    stderr comes through a pipe (a file would fall under a file-size limit too) and is kept in ``log``."""
    start = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read1(65536), b"")), daemon=True)
    reader.start()
    try:
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                proc.send_signal(signal.SIGKILL)
                break
            if time.monotonic() - start > timeout:
                pytest.fail(f"{command} still running after {timeout}s")
            time.sleep(0.001)
    finally:
        if proc.poll() is None and time.monotonic() - start > timeout:
            proc.kill()
        proc.wait()
        reader.join(timeout=30)
    stderr = b"".join(chunks).decode("utf-8", "replace")
    log.write_text(stderr, encoding="utf-8")
    return Outcome(proc.returncode == -signal.SIGKILL, proc.returncode, stderr, time.monotonic() - start)


def wrapped(wrapper: Path, fault: str, arg: Any, marker: Path, *args: Any) -> list[str]:
    return [sys.executable, str(wrapper), fault, str(arg), str(marker), *map(str, args)]


def limit_file_size(limit: int, command: list[str]) -> list[str]:
    """``command`` with files unable to grow past ``limit`` bytes: write() then fails with EFBIG
    (SIGXFSZ, which would kill the process instead, is ignored; both survive the exec)."""
    launcher = (
        "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", launcher, *command]


def train_args(data: Path, save_dir: Path, *more: Any) -> list[Any]:
    return ["train", data, *TINY_TRAIN_ARGS, "--epochs", EPOCHS, "--seed", SEED, "--save-dir", save_dir, *more]


def resume_args(data: Path, save_dir: Path, workers: int = 0) -> list[Any]:
    """What a user types to continue: the data, last.pt and run options (the recipe is last.pt's)."""
    return ["train", data, "--resume", save_dir / "last.pt", "--save-dir", save_dir,
            "--workers", workers, "--device", "cpu", "--no-progress"]


# --- what is on disk ------------------------------------------------------------------------


def same(a: Any, b: Any, where: str = "") -> None:
    """Recursive equality of checkpoint contents; tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"tensor {where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"keys of {where} differ: {sorted(a)} != {sorted(b)}"
        for key in a:
            same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"lengths of {where} differ"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def snapshot(save_dir: Path) -> dict[str, Any]:
    """What a run leaves that must not depend on how often it was killed and resumed."""
    out: dict[str, Any] = {"metrics": strip_timing(read_metrics(save_dir / "metrics.jsonl"))}
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(save_dir / name)
        out[name] = {
            "state_dict": ckpt.state_dict,
            "training_state": ckpt.training_state,
            "summary": {k: v for k, v in ckpt.summary.items() if k != "saved_at"},
            "train_config": {k: v for k, v in ckpt.train_config.items() if k not in RUN_FIELDS},
            "reference_stats": ckpt.reference_stats,
            "classes": ckpt.classes,
            "preprocess": ckpt.preprocess.to_dict(),
        }
    return out


def temporaries(save_dir: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(save_dir) if n.endswith(".tmp"))
    except FileNotFoundError:
        return []


def read_metrics_if_any(save_dir: Path) -> list[dict]:
    path = save_dir / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def check_checkpoints_load(save_dir: Path) -> int | None:
    """Every checkpoint on disk loads (never a corrupt file); returns last.pt's epoch, if any."""
    if (save_dir / "best.pt").exists():
        load_checkpoint(save_dir / "best.pt")
    if not (save_dir / "last.pt").exists():
        return None
    return int(load_checkpoint(save_dir / "last.pt").training_state["epoch"])


@dataclass
class Reference:
    save_dir: Path
    seconds: float
    snapshot: dict[str, Any]


@pytest.fixture(scope="module")
def reference(image_folder, env, tmp_path_factory) -> Reference:
    """The uninterrupted run every faulted run must end up equal to."""
    save_dir = tmp_path_factory.mktemp("reference") / "run"
    done = run_until(cnnkit_command(*train_args(image_folder, save_dir)), env, save_dir.parent / "stderr.log")
    assert done.returncode == 0, done.stderr
    return Reference(save_dir, done.seconds, snapshot(save_dir))


def continue_run(image_folder: Path, save_dir: Path, env: dict[str, str], log: Path) -> list[Any]:
    """The arguments that continue a killed run: --resume when last.pt exists; otherwise a restart,
    after checking that --resume says one is needed."""
    if (save_dir / "last.pt").exists():
        return resume_args(image_folder, save_dir)
    refused = run_until(cnnkit_command(*resume_args(image_folder, save_dir)), env, log)
    assert refused.returncode == 4, refused.stderr
    if save_dir.exists():  # the run had started: the error says to start it again
        assert_one_line_error(refused.stderr, "checkpoint not found", "start it again", "--force")
    else:
        assert_one_line_error(refused.stderr, "checkpoint not found")
    return train_args(image_folder, save_dir, "--force")


# --- 1. kill -9 during training -------------------------------------------------------------


def _past(deadline: float) -> bool:
    return time.monotonic() >= deadline


def _past_or_first_epoch_done(deadline: float, metrics: Path) -> bool:
    """The deadline has passed, or the first epoch has written its metrics row (its checkpoints
    come next): a kill then leaves at least two epochs for the plan's later steps to hit."""
    if time.monotonic() >= deadline:
        return True
    try:
        return b"\n" in metrics.read_bytes()
    except FileNotFoundError:
        return False


def _writing_last(save_dir: Path, stale: set[str]) -> bool:
    """A new last.pt temporary exists (a killed run's stale one may linger until the new run starts)."""
    return any(name.startswith(".last.pt.") and name not in stale for name in temporaries(save_dir))


def kill_resume_chain(image_folder, save_dir, env, wrapper, tmp_path, reference, plan) -> list[str]:
    """Run the plan's kills one after another, each followed by the checks; finish the run;
    return what each kill hit."""
    notes = []
    args = train_args(image_folder, save_dir)
    for step, (kind, value) in enumerate(plan):
        log, marker = tmp_path / f"{step}-{kind}.log", tmp_path / f"{step}.marker"
        before = {name: digest(save_dir / name) for name in ("best.pt", "last.pt")}
        epoch_before = check_checkpoints_load(save_dir) if save_dir.exists() else None
        command = cnnkit_command(*args)
        if kind == "before-first-epoch":  # the run has started (metrics.jsonl is written first)
            condition = (save_dir / "metrics.jsonl").exists
        elif kind == "random":
            condition = functools.partial(_past, time.monotonic() + value)
        elif kind == "random-in-first-epoch":
            assert epoch_before is None and not read_metrics_if_any(save_dir), "the run must start from scratch"
            condition = functools.partial(_past_or_first_epoch_done, time.monotonic() + value,
                                          save_dir / "metrics.jsonl")
        elif kind == "writing-last":  # nothing patched: poll for last.pt's temporary
            condition = functools.partial(_writing_last, save_dir, set(temporaries(save_dir)))
        elif kind == "stalled-write":
            # A run from last.pt's epoch e writes at least EPOCHS - e + 1 more checkpoints (last.pt
            # each epoch, then best.pt's drift statistics): an earlier kill that landed late still
            # leaves the value-th write to hit.
            writes_left = EPOCHS - (epoch_before or 0) + 1
            command = wrapped(wrapper, "stall-save", min(value, writes_left), marker, *args)
            condition = marker.exists
        elif kind == "finishing":
            command = wrapped(wrapper, "stall-finish", 0, marker, *args)
            condition = marker.exists
        else:
            raise AssertionError(kind)
        outcome = run_until(command, env, log, condition)
        if not outcome.killed and outcome.returncode == 0 and kind in ("random", "writing-last"):
            # a late draw of the slow test: the run finished first (after a kill while it completed
            # best.pt, a resume writes no last.pt at all)
            notes.append(f"{kind}: {FINISHED}")
            break
        assert outcome.killed, f"{kind}: the run ended before the kill (exit {outcome.returncode}):\n{outcome.stderr}"
        epoch = check_checkpoints_load(save_dir)
        left = temporaries(save_dir)
        if kind == "before-first-epoch":
            assert epoch is None
        if kind == "writing-last" and _writing_last(save_dir, set()):
            # killed before the rename: the previous last.pt is untouched
            assert digest(save_dir / "last.pt") == before["last.pt"]
        if kind == "stalled-write":
            (partial,) = [n for n in left if n.startswith(CHECKPOINT_TMP)]
            assert (save_dir / partial).stat().st_size > 0
            target = partial[1:].rsplit(".", 2)[0]  # .best.pt.XXXXXXXX.tmp -> best.pt
            # the file being replaced is as it was when the write began (the marker holds its digest)
            assert (digest(save_dir / target) or "") == marker.read_text()
        if kind == "finishing":
            assert epoch == EPOCHS and load_checkpoint(save_dir / "best.pt").reference_stats is None
        notes.append(f"{kind}: last.pt epoch {epoch_before} -> {epoch}, left {left or 'no temporaries'}")
        if epoch == EPOCHS and load_checkpoint(save_dir / "best.pt").reference_stats is not None:
            # the kill came as the finished run exited: nothing is left for later kills to hit
            notes.append(f"{kind}: {FINISHED}")
            break
        args = continue_run(image_folder, save_dir, env, tmp_path / f"{step}-refused.log")
    else:
        done = run_until(cnnkit_command(*args), env, tmp_path / "final.log")
        assert done.returncode == 0, done.stderr
    same(snapshot(save_dir), reference.snapshot, "run")
    assert temporaries(save_dir) == [], "a killed write's temporary was left behind"
    return notes


def test_kill_9_at_random_points_and_mid_write_then_resume_equals_the_uninterrupted_run(
    image_folder, env, wrapper, tmp_path, reference
):
    rng = random.Random(SEED)
    # Start-up (importing torch) is most of a tiny run: a random time late in it lands in training,
    # but a run faster than the reference (which pays the cold imports) could reach its last epoch
    # first and leave the later steps nothing to hit, so that kill comes no later than the end of
    # the first epoch. Then last.pt holds at most epoch 1, and the third checkpoint write is in
    # epoch 2 or later (epoch 2's last.pt, epoch 3's last.pt and the finished run's best.pt are
    # three): a kill there leaves a last.pt to resume.
    plan = [
        ("before-first-epoch", None),
        ("random-in-first-epoch", rng.uniform(0.55, 0.85) * reference.seconds),
        ("writing-last", None),
        ("stalled-write", 3),
        ("finishing", None),
    ]
    notes = kill_resume_chain(image_folder, tmp_path / "run", env, wrapper, tmp_path, reference, plan)
    print("\n".join(notes))
    assert len(notes) == len(plan) and not any(FINISHED in note for note in notes), notes  # every kill hit


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_many_random_kills_then_resume_equals_the_uninterrupted_run(
    image_folder, env, wrapper, tmp_path, reference, seed
):
    rng = random.Random(seed)
    plan = []
    for i in range(8):
        if i % 3 == 2:
            plan.append(("writing-last", None))
        elif i % 3 == 1:
            plan.append(("stalled-write", rng.randint(1, 2)))
        else:
            plan.append(("random", rng.uniform(0.1, 0.7) * reference.seconds))
    notes = kill_resume_chain(image_folder, tmp_path / "run", env, wrapper, tmp_path, reference, plan)
    print("\n".join(notes))


# --- 2. disk full, unwritable save dir ------------------------------------------------------


@pytest.fixture(scope="module")
def after_epoch_one(image_folder, env, tmp_path_factory) -> Path:
    """A run killed just after it saved last.pt for the first time. Read-only: copy it."""
    save_dir = tmp_path_factory.mktemp("after-epoch-one") / "run"
    killed = run_until(cnnkit_command(*train_args(image_folder, save_dir)), env, save_dir.parent / "stderr.log",
                       lambda: (save_dir / "last.pt").exists())
    assert killed.killed, killed.stderr
    assert check_checkpoints_load(save_dir) < EPOCHS
    return save_dir


# The metrics.jsonl case (~30 s: a failed and a full resume) runs with -m slow; the default suite
# keeps the checkpoint case, the atomic-write path a full disk must not corrupt.
@pytest.mark.parametrize("full_at", ["checkpoint", pytest.param("metrics", marks=pytest.mark.slow)])
def test_disk_full_in_training_keeps_the_checkpoints_and_the_run_resumes(
    image_folder, env, reference, after_epoch_one, tmp_path, full_at
):
    save_dir = Path(shutil.copytree(after_epoch_one, tmp_path / "run"))
    before = {name: digest(save_dir / name) for name in ("best.pt", "last.pt")}
    epoch = check_checkpoints_load(save_dir)
    if full_at == "checkpoint":  # metrics.jsonl and curves.png fit, a checkpoint does not
        limit, fragment = 1_000_000, ".pt"
    else:  # the resumed run rewrites metrics.jsonl (its rows up to last.pt); the next row does not fit
        kept = [row for row in read_metrics(save_dir / "metrics.jsonl") if row["epoch"] <= epoch]
        limit, fragment = sum(len(json.dumps(row)) + 1 for row in kept) + 40, "metrics.jsonl"
    failed = run_until(limit_file_size(limit, cnnkit_command(*resume_args(image_folder, save_dir))), env,
                       tmp_path / "full.log")
    assert failed.returncode == 6, failed.stderr
    assert_one_line_error(failed.stderr, "cannot write", fragment, os.strerror(errno.EFBIG))
    assert {name: digest(save_dir / name) for name in before} == before  # intact, not half-replaced
    assert check_checkpoints_load(save_dir) == epoch
    assert temporaries(save_dir) == []
    done = run_until(cnnkit_command(*resume_args(image_folder, save_dir)), env, tmp_path / "resumed.log")
    assert done.returncode == 0, done.stderr
    same(snapshot(save_dir), reference.snapshot, "run")


def test_save_dir_that_cannot_be_created_is_refused_before_training(image_folder, env, tmp_path):
    (tmp_path / "afile").write_text("a regular file\n")
    save_dir = tmp_path / "afile" / "run"
    failed = run_until(cnnkit_command(*train_args(image_folder, save_dir)), env, tmp_path / "stderr.log")
    assert failed.returncode == 6
    assert_one_line_error(failed.stderr, "cannot create --save-dir", str(save_dir))
    assert "epoch 1" not in failed.stderr and "training resnet18" not in failed.stderr


def test_read_only_save_dir_is_refused_before_training(image_folder, env, tmp_path):
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    save_dir.chmod(0o555)
    try:
        prefix = as_ordinary_user(["touch", str(save_dir / "probe")])
        failed = run_until(prefix + cnnkit_command(*train_args(image_folder, save_dir)), env, tmp_path / "stderr.log")
    finally:
        save_dir.chmod(0o755)
    assert failed.returncode == 6, failed.stderr
    assert_one_line_error(failed.stderr, "--save-dir", "not writable")
    assert "epoch 1" not in failed.stderr and list(save_dir.iterdir()) == []


@pytest.fixture(scope="module")
def full_predictions(image_folder, reference, env, tmp_path_factory) -> bytes:
    """predict --output of every image of the data set, uninterrupted (CSV)."""
    out = tmp_path_factory.mktemp("predictions") / "full.csv"
    done = run_until(cnnkit_command("predict", image_folder, "-c", reference.save_dir / "best.pt", "-o", out, *SCORING),
                     env, out.with_suffix(".log"))
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


def test_disk_full_in_predict_output_keeps_the_rows_and_resume_completes(
    image_folder, reference, full_predictions, env, tmp_path
):
    out = tmp_path / "scores.csv"
    # --workers 0: the file-size limit would also stop DataLoader workers from sharing their batches
    # (torch then loses the batch and waits forever: a limit artefact; a full disk does not do that)
    command = cnnkit_command("predict", image_folder, "-c", reference.save_dir / "best.pt", "-o", out, *SCORING,
                     "--workers", "0")
    limit = len(full_predictions) // 2
    failed = run_until(limit_file_size(limit, command), env, tmp_path / "full.log")
    assert failed.returncode == 6, failed.stderr
    assert_one_line_error(failed.stderr, f"cannot write {out}", os.strerror(errno.EFBIG), "--resume")
    written = out.read_bytes()
    assert len(written) == limit and full_predictions.startswith(written)  # whole rows and a cut one, all intact
    done = run_until(command + ["--resume"], env, tmp_path / "resumed.log")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == full_predictions  # nothing twice, nothing missing


class _DiskFullFile:
    """A text output file on a disk with ``room`` characters left: the write that overflows
    writes what fits, then fails with ENOSPC (as write(2) does)."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, text: str) -> int:
        if len(text) > self.room:
            self.handle.write(text[: self.room])
            self.handle.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(text)
        return self.handle.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> "_DiskFullFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.close()


def test_out_of_space_in_predict_output_in_process_keeps_the_rows_and_resume_completes(
    image_folder, reference, tmp_path, monkeypatch
):
    import io

    def cfg(output: Path, **kw) -> PredictConfig:
        return PredictConfig(inputs=(str(image_folder),), checkpoint=str(reference.save_dir / "best.pt"),
                             output=str(output), top_k=2, batch_size=4, workers=0, device="cpu", progress=False, **kw)

    full = tmp_path / "full.jsonl"
    predict_to_output(cfg(full), io.StringIO())
    expected = full.read_bytes()
    out = tmp_path / "scores.jsonl"
    room = len(expected) * 2 // 3
    monkeypatch.setattr(predict_module, "open", lambda path, mode="r", *a, **k: _DiskFullFile(
        open(path, mode, *a, **k), room) if str(path) == str(out) and mode in ("w", "a") else open(path, mode, *a, **k),
        raising=False)
    with pytest.raises(OutputError) as info:
        predict_to_output(cfg(out), io.StringIO())
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message and "--resume" in message
    assert expected.startswith(out.read_bytes()) and len(out.read_bytes()) == room
    predict_to_output(cfg(out, resume=True), io.StringIO())
    assert out.read_bytes() == expected


# --- 3. a DataLoader worker dies ------------------------------------------------------------


def _victim(image_folder: Path) -> Path:
    images = sorted(p for p in image_folder.rglob("*") if p.suffix in (".jpg", ".png"))
    return images[len(images) // 2]  # in the middle: rows before it can be written


def test_killed_decoding_worker_in_predict_is_reported_and_resume_completes(
    image_folder, reference, full_predictions, env, wrapper, tmp_path
):
    out = tmp_path / "scores.csv"
    args = ["predict", image_folder, "-c", reference.save_dir / "best.pt", "-o", out, *SCORING, "--workers", "2"]
    marker = tmp_path / "died"
    command = wrapped(wrapper, "worker-kill", _victim(image_folder), marker, *args)
    failed = run_until(command, env, tmp_path / "kill.log")
    assert marker.exists(), "the worker never reached the victim"
    assert failed.returncode == WorkerError.exit_code, failed.stderr
    assert_one_line_error(failed.stderr, "worker process", "killed by signal", f"{out} keeps the rows", "--resume")
    written = out.read_bytes()
    assert full_predictions.startswith(written) and written.endswith(b"\n")  # whole rows, in order
    assert str(_victim(image_folder)).encode() not in written
    done = run_until(cnnkit_command(*args, "--resume"), env, tmp_path / "resumed.log")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == full_predictions  # the victim and the rest are scored, once each


def test_decoding_worker_exiting_in_predict_to_stdout_is_one_error_line(
    image_folder, reference, env, wrapper, tmp_path
):
    marker = tmp_path / "died"
    args = ["predict", image_folder, "-c", reference.save_dir / "best.pt", "--format", "csv", *SCORING,
            "--workers", "2"]
    command = wrapped(wrapper, "worker-exit", _victim(image_folder), marker, *args)
    failed = run_until(command, env, tmp_path / "exit.log")
    assert marker.exists()
    assert failed.returncode == WorkerError.exit_code, failed.stderr
    assert_one_line_error(failed.stderr, "worker process", "exit", "--workers 0")


# ~15 s each: -m slow; the default suite keeps predict's dying-worker tests (the same worker_death check)
@pytest.mark.slow
@pytest.mark.parametrize("epochs, where", [(2, "in epoch 2"), (1, "while completing")])
def test_killed_worker_in_training_is_reported_and_the_run_resumes(image_folder, env, wrapper, tmp_path, epochs, where):
    """Armed once epoch 1's metrics row is written, the worker dies in epoch 2 (while epoch 1's
    last.pt may still be written in the background: the stopped run waits for it), or, in a
    one-epoch run, in the pass over the training images for best.pt's open-set statistics."""
    save_dir = tmp_path / "run"
    victim = sorted((image_folder / "train" / "red").iterdir())[0]
    args = ["train", image_folder, *TINY_TRAIN_ARGS, "--workers", "1", "--epochs", epochs, "--save-dir", save_dir]
    marker = tmp_path / "died"
    failed = run_until(wrapped(wrapper, "worker-kill", f"{victim}|{save_dir / 'metrics.jsonl'}", marker, *args), env,
                       tmp_path / "kill.log")
    assert marker.exists()
    assert failed.returncode == WorkerError.exit_code, failed.stderr
    assert_one_line_error(failed.stderr, "worker process", "killed by signal", where, "holds epoch 1",
                          f"--resume {save_dir / 'last.pt'}")
    assert check_checkpoints_load(save_dir) == 1
    assert load_checkpoint(save_dir / "best.pt").open_set is None
    done = run_until(cnnkit_command(*resume_args(image_folder, save_dir, workers=1)), env, tmp_path / "resumed.log")
    assert done.returncode == 0, done.stderr
    assert [row["epoch"] for row in read_metrics(save_dir / "metrics.jsonl")] == list(range(1, epochs + 1))
    assert check_checkpoints_load(save_dir) == epochs
    assert load_checkpoint(save_dir / "best.pt").open_set is not None


# --- the pieces ---------------------------------------------------------------------------------


def test_a_new_run_removes_what_killed_writes_left_but_not_a_live_writers_file(tmp_path):
    from cnnkit.training.rundir import remove_stray_temporaries

    cache = tmp_path / "feature_cache"
    cache.mkdir()
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    strays = [".last.pt.k2j4x9_a.tmp", ".best.pt.0q1w2e3r.tmp", "metrics.jsonl.tmp", "curves.png.4242.tmp",
              f"feature_cache/train-ab12.npy.{exited.pid}.tmp"]
    kept = ["best.pt", "last.pt", "metrics.jsonl", "notes.tmp", ".other.pt.x.tmp", "feature_cache/train-ab12.npy",
            f"feature_cache/valid-cd34.npy.{os.getpid()}.tmp"]  # the last one: a live writer's
    for name in strays + kept:
        (tmp_path / name).write_bytes(b"PK\x03\x04 partial")
    remove_stray_temporaries(str(tmp_path))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)


def test_worker_death_reads_torchs_messages_and_nothing_else():
    from cnnkit.errors import worker_death

    try:
        try:
            raise RuntimeError("DataLoader worker (pid 4321) is killed by signal: Killed. ")
        except RuntimeError as handler_error:
            raise RuntimeError("DataLoader worker (pid(s) 4321) exited unexpectedly") from handler_error
    except RuntimeError as exc:
        chained = exc
    assert worker_death(chained) == (
        "a data-loading worker process (pid 4321) was killed by signal Killed (out of memory, or an image crashed "
        "its decoder)"
    )
    exited = RuntimeError("DataLoader worker (pid 7) exited unexpectedly with exit code 3. Details are lost due to "
                          "multiprocessing. Rerunning with num_workers=0 may give better error trace.")
    assert "(pid 7) exited unexpectedly with exit code 3" in worker_death(exited)
    assert worker_death(RuntimeError("CUDA out of memory")) is None
    assert WorkerError.exit_code == 8  # documented in cnnkit.errors and the README
    assert worker_death(ValueError("DataLoader worker (pid 1) exited unexpectedly")) is None


def test_disk_full_while_drawing_curves_is_an_output_error_after_the_checkpoints(image_folder, tmp_path, monkeypatch):
    """curves.png is written after the epoch's checkpoints; a full disk there was an internal error."""
    from matplotlib.figure import Figure

    from cnnkit.training import train

    def full_disk(self, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OutputError) as info:
        train(tiny_train_config(image_folder, tmp_path, epochs=1))
    assert str(info.value) == f"cannot write {tmp_path / 'curves.png'}: No space left on device"
    assert check_checkpoints_load(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]
