"""The ``cnnkit`` command as a user runs it: real subprocesses for end-to-end runs, click's
CliRunner for the many bad inputs (each: its documented exit code and one error line)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torchvision.models import get_model, get_model_weights

from cnnkit import __version__
from cnnkit.cli import main

from helpers import (
    CLASSES,
    NAMES,
    TINY_TRAIN_ARGS,
    assert_one_line_error,
    interrupt_training_call,
    read_metrics,
    run_cli,
    strip_timing,
    write_class_images,
    write_corrupt_files,
)


def invoke(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="cnnkit")


# --- end to end, in a subprocess --------------------------------------------------------------


def test_train_then_predict_with_names(image_folder, category_names, tmp_path, cli_env):
    save_dir = tmp_path / "run"
    trained = run_cli(
        ["train", str(image_folder), *TINY_TRAIN_ARGS, "--epochs", "1", "--save-dir", str(save_dir),
         "--category-names", str(category_names)],
        cli_env,
    )
    assert trained.returncode == 0, trained.stderr
    assert "Traceback" not in trained.stderr
    assert f"checkpoint {save_dir / 'best.pt'}" in trained.stdout
    assert "epoch 1/1" in trained.stderr  # the per-epoch log line goes to stderr
    assert len(read_metrics(save_dir / "metrics.jsonl")) == 1

    image = sorted((image_folder / "valid" / "red").iterdir())[0]
    scored = run_cli(["predict", str(image), "--checkpoint", str(save_dir / "best.pt"), "--top-k", "3", "--format", "json"], cli_env)
    assert scored.returncode == 0, scored.stderr
    (row,) = json.loads(scored.stdout)
    assert row["path"] == str(image)
    assert {g["name"] for g in row["predictions"]} == set(NAMES.values())  # names from the checkpoint
    assert sum(g["probability"] for g in row["predictions"]) == pytest.approx(1.0, abs=1e-4)


def test_predict_accepts_the_seed_projects_image_checkpoint_order(trained, sample_images, cli_env):
    result = run_cli(["predict", str(sample_images[2]), str(trained.best), "--top-k", "2"], cli_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(sample_images[2])
    assert len(lines) == 3 and lines[1].lstrip().startswith("1.") and lines[2].lstrip().startswith("2.")
    assert any(name in lines[1] for name in NAMES.values()) and "%" in lines[1]


def test_predict_reads_paths_from_stdin(trained, sample_images, cli_env):
    paths = [str(p) for p in reversed(sample_images)]
    result = run_cli(["predict", "-", "-c", str(trained.best), "--format", "jsonl"], cli_env, stdin="\n".join(paths) + "\n")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["path"] for row in rows] == paths
    assert all(row["predictions"][0]["label"] in CLASSES for row in rows)


def test_json_output_is_clean_on_stdout_with_logs_on_stderr(trained, image_folder, cli_env):
    result = run_cli(["predict", str(image_folder / "valid"), "-c", str(trained.best), "-k", "5", "--format", "json"], cli_env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)  # nothing but the JSON document on stdout
    assert len(rows) == 6 and all(len(row["predictions"]) == 3 for row in rows)
    assert "warning: --top-k 5 is more than the 3 classes" in result.stderr


def test_mixed_folder_exits_7_and_still_scores_the_good_images(trained, sample_images, tmp_path, cli_env):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for image in sample_images[:2]:
        shutil.copy(image, folder / image.name)
    bad = write_corrupt_files(folder)
    result = run_cli(["predict", str(folder), "-c", str(trained.best), "--format", "csv"], cli_env)
    assert result.returncode == 7
    lines = result.stdout.splitlines()
    assert lines[0].split(",") == ["path", "label", "name", "probability", "error"]
    assert len(lines) == 1 + 2 + len(bad)
    assert_one_line_error(result.stderr, f"{len(bad)} of {2 + len(bad)} inputs could not be scored")


def test_info_shows_the_checkpoint(trained, cli_env):
    result = run_cli(["info", str(trained.best)], cli_env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "arch         resnet18" in out and "resize 36, crop 32, bilinear" in out
    for label, name in NAMES.items():
        assert label in out and name in out
    assert "resumable" not in out.splitlines()[0]


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from cnnkit.cli import main\n"
        "for args in (['--help'], ['train', '--help'], ['predict', '--help'], ['info', '--help'], ['explain', '--help'], ['inspect', '--help']):\n"
        "    try:\n"
        "        main(args, prog_name='cnnkit')\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (args, exc.code)\n"
        "heavy = sorted(m for m in ('torch', 'torchvision') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "predict" in result.stdout and "Exit codes" in result.stdout
    assert "--weights" in result.stdout and "--top-k" in result.stdout


# --- CliRunner: the success paths that need no subprocess -----------------------------------


def test_version():
    result = invoke(["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


def test_info_json_is_machine_readable(trained):
    result = invoke(["info", trained.last, "--json"])
    assert result.exit_code == 0, result.stderr
    meta = json.loads(result.stdout)
    assert meta["arch"] == "resnet18" and meta["resumable"] is True
    assert [c["name"] for c in meta["classes"]] == [NAMES[c] for c in CLASSES]


# --- CliRunner: each bad input gives its exit code and one line -------------------------------


@pytest.fixture
def bad(tmp_path, image_folder, trained):
    """Files for the bad-input table."""
    paths = {"data": image_folder, "best": trained.best, "last": trained.last, "tmp": tmp_path}
    paths["text"] = tmp_path / "notes.pt"
    paths["text"].write_text("not a checkpoint\n")
    paths["truncated"] = tmp_path / "cut.pt"
    with open(trained.best, "rb") as handle:
        paths["truncated"].write_bytes(handle.read(4096))
    paths["bad_json"] = tmp_path / "bad.json"
    paths["bad_json"].write_text("{nope")
    paths["few_names"] = tmp_path / "few.json"
    paths["few_names"].write_text(json.dumps({"red": "Red"}))
    paths["a_file"] = tmp_path / "afile"
    paths["a_file"].write_text("a file, not a folder")
    empty_class = tmp_path / "empty-class"
    write_class_images(empty_class / "red", "red", 2, np.random.default_rng(0))
    (empty_class / "green").mkdir()
    paths["empty_class"] = empty_class
    one_each = tmp_path / "one-each"
    for colour in CLASSES:
        write_class_images(one_each / colour, colour, 1, np.random.default_rng(1))
    paths["one_each"] = one_each
    existing = tmp_path / "existing-run"
    existing.mkdir()
    (existing / "best.pt").write_bytes(b"precious")
    paths["existing"] = existing
    paths["corrupt_image"] = write_corrupt_files(tmp_path / "corrupt")["garbage"]
    paths["other_weights"] = tmp_path / "mobilenet.pth"
    torch.save(get_model("mobilenet_v3_small", weights=None).state_dict(), paths["other_weights"])

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    paths["evil"] = tmp_path / "evil.pt"
    torch.save({"format": "cnnkit-checkpoint", "format_version": 1, "x": Evil()}, paths["evil"])
    paths["future"] = tmp_path / "future.pt"
    torch.save({"format": "cnnkit-checkpoint", "format_version": 99}, paths["future"])
    return paths


TRAIN = ["--arch", "resnet18", "--weights", "none", "--epochs", "1", "--workers", "0", "--device", "cpu", "--no-progress"]

BAD_INPUTS = [
    # train: data problems (3)
    ("train-missing-data", lambda p: ["train", p["tmp"] / "nowhere", *TRAIN], 3, "DATA_DIR not found"),
    ("train-empty-class", lambda p: ["train", p["empty_class"], *TRAIN], 3, "has no images"),
    ("train-bad-names-json", lambda p: ["train", p["data"], *TRAIN, "--category-names", p["bad_json"]], 3, "not valid JSON"),
    ("train-names-missing-classes", lambda p: ["train", p["data"], *TRAIN, "--category-names", p["few_names"]], 3, "no name for classes: blue, green"),
    ("train-too-few-images-to-split", lambda p: ["train", p["one_each"], *TRAIN], 3, "too few images"),
    # train: bad option values (2)
    ("train-epochs-0", lambda p: ["train", p["data"], *TRAIN, "--epochs", "0"], 2, "--epochs must be at least 1"),
    ("train-unknown-arch", lambda p: ["train", p["data"], *TRAIN, "--arch", "resnet9000"], 2, "unknown --arch 'resnet9000'; valid:"),
    ("train-bad-device", lambda p: ["train", p["data"], *TRAIN, "--device", "gpu"], 2, "--device must be"),
    ("train-gpu-vs-device", lambda p: ["train", p["data"], *TRAIN, "--gpu"], 2, "--gpu contradicts --device cpu"),
    ("train-val-split", lambda p: ["train", p["data"], *TRAIN, "--val-split", "1.5"], 2, "--val-split"),
    ("train-crop-over-resize", lambda p: ["train", p["data"], *TRAIN, "--image-size", "64", "--resize-size", "32"], 2, "resize_size (32) must be at least image_size (64)"),
    ("train-negative-hidden", lambda p: ["train", p["data"], *TRAIN, "--hidden-units", "-1"], 2, "--hidden-units"),
    ("train-unknown-weights-name", lambda p: ["train", p["data"], *TRAIN, "--weights", "IMAGENET9K", "--save-dir", p["tmp"] / "o"], 2, "unknown --weights 'IMAGENET9K'"),
    # train: weights (5)
    ("train-missing-weights-file", lambda p: ["train", p["data"], *TRAIN, "--weights", p["tmp"] / "nope.pth", "--save-dir", p["tmp"] / "o"], 5, "weights file not found"),
    ("train-weights-of-another-arch", lambda p: ["train", p["data"], *TRAIN, "--weights", p["other_weights"], "--save-dir", p["tmp"] / "o"], 5, "does not fit resnet18"),
    # train: output (6)
    ("train-existing-run", lambda p: ["train", p["data"], *TRAIN, "--save-dir", p["existing"]], 6, "--force"),
    ("train-save-dir-under-a-file", lambda p: ["train", p["data"], *TRAIN, "--save-dir", p["a_file"] / "sub"], 6, "cannot create --save-dir"),
    # train: resume checkpoint problems (4)
    ("train-resume-not-a-checkpoint", lambda p: ["train", p["data"], "--resume", p["text"]], 4, "not a cnnkit checkpoint"),
    ("train-resume-missing", lambda p: ["train", p["data"], "--resume", p["tmp"] / "gone.pt"], 4, "checkpoint not found"),
    ("train-resume-best", lambda p: ["train", p["data"], "--resume", p["best"], "--save-dir", p["tmp"] / "o"], 4, "cannot be resumed"),
    ("train-resume-unsafe", lambda p: ["train", p["data"], "--resume", p["evil"]], 4, "arbitrary Python objects"),
    # train: resume recipe conflicts (2)
    ("train-resume-other-arch", lambda p: ["train", p["data"], "--resume", p["last"], "--arch", "mobilenet_v3_small", "--epochs", "9", "--save-dir", p["tmp"] / "o"], 2, "--arch differ"),
    ("train-resume-finished", lambda p: ["train", p["data"], "--resume", p["last"], "--epochs", "3", "--save-dir", p["tmp"] / "o"], 2, "already trained 3 epochs"),
    # predict
    ("predict-missing-checkpoint", lambda p: ["predict", p["data"], "-c", p["tmp"] / "gone.pt"], 4, "checkpoint not found"),
    ("predict-not-a-checkpoint", lambda p: ["predict", p["data"], "-c", p["text"]], 4, "not a cnnkit checkpoint"),
    ("predict-truncated-checkpoint", lambda p: ["predict", p["data"], "-c", p["truncated"]], 4, "truncated or corrupt"),
    ("predict-future-checkpoint", lambda p: ["predict", p["data"], "-c", p["future"]], 4, "upgrade cnnkit"),
    ("predict-top-k-0", lambda p: ["predict", p["data"], "-c", p["best"], "--top-k", "0"], 2, "--top-k must be at least 1"),
    ("predict-names-missing-classes", lambda p: ["predict", p["data"], "-c", p["best"], "--category-names", p["few_names"], "--device", "cpu"], 3, "no name for classes"),
    ("predict-names-file-missing", lambda p: ["predict", p["data"], "-c", p["best"], "--category-names", p["tmp"] / "nope.json", "--device", "cpu"], 3, "not found"),
    ("predict-only-bad-input", lambda p: ["predict", p["corrupt_image"], "-c", p["best"], "--device", "cpu", "--workers", "0"], 7, "1 of 1 inputs could not be scored"),
    # info
    ("info-not-a-checkpoint", lambda p: ["info", p["text"]], 4, "not a cnnkit checkpoint"),
    ("info-missing", lambda p: ["info", p["tmp"] / "gone.pt"], 4, "checkpoint not found"),
    ("info-unsafe", lambda p: ["info", p["evil"]], 4, "arbitrary Python objects"),
    ("info-folder", lambda p: ["info", p["tmp"]], 4, "folder"),
]


@pytest.mark.parametrize("build, code, fragment", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gives_its_exit_code_and_one_error_line(bad, build, code, fragment, monkeypatch):
    monkeypatch.chdir(bad["tmp"])  # the default --save-dir (checkpoints/) must not be the project's
    result = invoke(build(bad))
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    assert_one_line_error(result.stderr, fragment)
    if code != 7:
        assert result.stdout == ""
    assert not (bad["tmp"] / "pwned").exists()
    assert (bad["existing"] / "best.pt").read_bytes() == b"precious"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "predict"])
def test_unavailable_cuda_is_a_usage_error(bad, command, monkeypatch):
    monkeypatch.chdir(bad["tmp"])
    args = ["train", bad["data"], "--weights", "none", "--gpu"] if command == "train" else ["predict", bad["data"], "-c", bad["best"], "--gpu"]
    result = invoke(args)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "CUDA is not available")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["predict", "photo.jpg"], "--checkpoint"),  # no checkpoint given
        (["predict", "a.jpg", "b.jpg"], "--checkpoint"),  # two images are not IMAGE CHECKPOINT
        (["train"], "Missing argument 'DATA_DIR'"),
        (["train", "data", "--epochs", "many"], "'many' is not a valid integer"),
        (["train", "data", "--scheduler", "linear"], "'linear' is not one of"),
        (["predict", "a.jpg", "-c", "m.pt", "--format", "xml"], "'xml' is not one of"),
        (["fly"], "No such command 'fly'"),
    ],
)
def test_usage_errors_exit_2_without_a_traceback(args, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8")
    result = invoke([str(tmp_path / a) if a == "b.jpg" else a for a in args])
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert "Error:" in result.stderr and fragment in result.stderr


def test_default_weights_offline_exit_5_with_one_line_naming_cache_and_alternatives(image_folder, tmp_path, empty_torch_home, monkeypatch):
    import torch.hub

    def offline(url, *args, **kwargs):
        raise __import__("urllib.error").error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    result = invoke(["train", image_folder, "--arch", "resnet18", "--save-dir", tmp_path / "run", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 5, result.stderr
    cache = os.path.join(str(empty_torch_home), "hub", "checkpoints", os.path.basename(get_model_weights("resnet18").DEFAULT.url))
    assert_one_line_error(result.stderr, cache, "--weights PATH", "--weights none")
    assert not (tmp_path / "run" / "best.pt").exists()


def test_internal_error_is_one_line_with_the_way_to_the_traceback(trained, monkeypatch):
    import cnnkit.models.checkpoint

    def broken(path):
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(cnnkit.models.checkpoint, "describe", broken)
    result = invoke(["info", trained.best])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "internal error: RuntimeError: something unexpected", "CNNKIT_DEBUG=1")


def test_debug_env_shows_the_traceback(trained, monkeypatch):
    import cnnkit.models.checkpoint

    monkeypatch.setattr(cnnkit.models.checkpoint, "describe", lambda path: 1 / 0)
    monkeypatch.setenv("CNNKIT_DEBUG", "1")
    result = invoke(["info", trained.best])
    assert result.exit_code != 0
    assert isinstance(result.exception, ZeroDivisionError)


def test_ctrl_c_in_training_exits_130_saying_nothing_was_saved(image_folder, tmp_path, monkeypatch):
    interrupt_training_call(monkeypatch, 1)
    result = invoke(["train", image_folder, *TINY_TRAIN_ARGS, "--save-dir", tmp_path / "run"])
    assert result.exit_code == 130
    assert_one_line_error(result.stderr, "interrupted in epoch 1", "nothing was saved")


def test_ctrl_c_elsewhere_exits_130(trained, monkeypatch):
    import cnnkit.models.checkpoint

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(cnnkit.models.checkpoint, "describe", interrupted)
    result = invoke(["info", trained.best])
    assert result.exit_code == 130
    assert_one_line_error(result.stderr, "interrupted")


# --- resume from the command line -----------------------------------------------------------


def test_resume_without_epochs_finishes_the_interrupted_run(interrupted, trained, image_folder, tmp_path):
    """README: a resumed run keeps its recipe and continues to the same result as a run that was
    never interrupted. The interrupted run was a 3-epoch run: resuming it without --epochs must
    train epoch 3 and stop, not switch to the --epochs default (5) and its learning-rate schedule."""
    run_dir = Path(shutil.copytree(interrupted[1], tmp_path / "run"))
    result = invoke(["train", image_folder, "--resume", run_dir / "last.pt", "--save-dir", run_dir,
                     "--workers", "0", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.stderr
    assert "best validation accuracy" in result.stdout
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert strip_timing(rows) == strip_timing(read_metrics(trained.metrics))
