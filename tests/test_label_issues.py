"""cnnkit inspect --label-issues: on tiny colour pictures (10 a class, 32 px) with two planted
mislabelled ones (a red picture in green/, a blue one in red/), the planted pair comes first with
the right suggested label, from a checkpoint's backbone and from --arch with a weights file;
the folds, the files of --output, the one-line errors of bad flags and of a missing extra."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("imagehash")
pytest.importorskip("cleanlab")

from cnnkit.cli import main  # noqa: E402
from cnnkit.config import InspectConfig, PreprocessConfig  # noqa: E402
from cnnkit.errors import DataError  # noqa: E402
from cnnkit.inspect_data import format_summary, inspect_data  # noqa: E402
from cnnkit.label_issues import HEAD_C, choose_folds, out_of_fold_probabilities, write_files  # noqa: E402

from helpers import CLASSES, NAMES, assert_one_line_error, cli_subprocess_env, colour_image, run_cli  # noqa: E402

PER_CLASS = 10
PLANTED = {"green/planted_red.png": ("green", "red"), "red/planted_blue.png": ("red", "blue")}  # given, true


def write_colour_folder(root: Path, per_class: dict[str, int] | None = None, seed: int = 0) -> Path:
    """ROOT/<colour>/*.png, 32 px noisy colour pictures, ``per_class`` of each (PER_CLASS)."""
    rng = np.random.default_rng(seed)
    for colour in CLASSES:
        (root / colour).mkdir(parents=True, exist_ok=True)
        for i in range((per_class or {}).get(colour, PER_CLASS)):
            colour_image(colour, rng, (32, 32)).save(root / colour / f"{colour}_{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    root = write_colour_folder(tmp_path_factory.mktemp("labels") / "data")
    rng = np.random.default_rng(99)
    for name, (_, true) in PLANTED.items():
        colour_image(true, rng, (32, 32)).save(root / name)
    return root


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> dict[str, Path]:
    """A tiny cnnkit checkpoint (seeded resnet18, 32 px preprocessing) and the same backbone as a
    torchvision state_dict file; read-only."""
    import torch

    from cnnkit.models.build import build_model
    from cnnkit.models.checkpoint import Checkpoint

    folder = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    model, head = build_model("resnet18", len(CLASSES), "none", hidden_units=0)
    Checkpoint("resnet18", head, model.state_dict(), list(CLASSES), PreprocessConfig(32, 32),
               class_names=dict(NAMES)).save(folder / "tiny.pt")
    torch.manual_seed(0)
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), folder / "resnet18.pth")
    return {"checkpoint": folder / "tiny.pt", "weights": folder / "resnet18.pth"}


def invoke(args: list) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="cnnkit")


def assert_planted_first(found: dict, root: Path) -> None:
    top = found["suspects"][:2]
    assert {Path(s["path"]).relative_to(root).as_posix() for s in top} == set(PLANTED), found["suspects"]
    for s in top:
        given, true = PLANTED[Path(s["path"]).relative_to(root).as_posix()]
        assert (s["given"], s["suggested"], s["split"]) == (given, true, "all")
        assert s["p_given"] < 0.2 < 0.8 < s["p_suggested"]
    assert [s["rank"] for s in found["suspects"]] == list(range(1, found["issues"] + 1))
    assert found["images"] == 3 * PER_CLASS + 2 and found["classes"] == list(CLASSES)


@pytest.mark.parametrize("backbone", ["checkpoint", "weights"])
def test_the_planted_images_are_ranked_first_with_the_right_suggestion(backbone, planted, backbones):
    flags = ({"checkpoint": str(backbones["checkpoint"])} if backbone == "checkpoint"
             else {"arch": "resnet18", "weights": str(backbones["weights"]), "image_size": 32})
    report = inspect_data(InspectConfig(str(planted), label_issues=True, device="cpu", workers=0, progress=False,
                                        **flags)).report
    found = report["label_issues"]
    assert_planted_first(found, planted)
    assert found["folds"] == 5 and found["out_of_fold_accuracy"] >= 0.9 and found["head_c"] in HEAD_C
    assert found["names"] == (NAMES if backbone == "checkpoint" else {})  # a checkpoint brings its names
    summary = format_summary(report)
    assert "label issues: " in summary and str(planted / "red" / "planted_blue.png") in summary


def test_out_of_fold_probabilities_are_seeded_and_never_from_a_head_that_saw_the_row():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 8)
    features = rng.normal(size=(24, 6)).astype(np.float32)
    features[np.arange(24), labels] += 4.0  # separable
    features[0] = features[23]  # row 0 (class 0) is a copy of a class-2 row: only a head that saw it says 0
    probs, c = out_of_fold_probabilities(features, labels, 3, 4, seed=1)
    assert probs.shape == (24, 3) and np.allclose(probs.sum(axis=1), 1) and c in HEAD_C
    assert probs[0].argmax() == 2 and probs[0, 0] < 0.5
    assert np.array_equal(probs, out_of_fold_probabilities(features, labels, 3, 4, seed=1)[0])
    assert not np.array_equal(probs, out_of_fold_probabilities(features, labels, 3, 4, seed=2)[0])


def test_the_heads_take_the_regularisation_whose_out_of_fold_probabilities_fit_best():
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    features = rng.normal(size=(120, 60))  # many features, few images, a weak signal: C=1 over-fits
    features[np.arange(120), labels] += 1.0
    probs, c = out_of_fold_probabilities(features, labels, 4, 5, seed=0, strengths=(0.01, 1.0))
    losses = {s: log_loss(labels, out_of_fold_probabilities(features, labels, 4, 5, seed=0, strengths=(s,))[0])
              for s in (0.01, 1.0)}
    assert c == min(losses, key=losses.get) == 0.01


def test_a_small_class_reduces_the_folds_and_a_single_image_class_is_one_line(caplog):
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        assert choose_folds(5, ["a", "b"], np.array([9, 3])) == 3
    assert "class b has only 3 readable images: using 3 folds instead of 5" in caplog.text
    assert choose_folds(5, ["a", "b"], np.array([9, 7])) == 5
    with pytest.raises(DataError, match=r"at least 2 readable images in every class; b has fewer: add images"):
        choose_folds(5, ["a", "b", "c"], np.array([9, 1, 4]))


def test_the_cli_writes_the_csv_the_gallery_and_the_page(planted, backbones, tmp_path):
    out = tmp_path / "report"
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"blue": "Sky", "green": "Leaf", "red": "Rose"}), encoding="utf-8")
    done = run_cli(["inspect", planted, "--label-issues", "--checkpoint", backbones["checkpoint"], "--output", out,
                    "--json", "--category-names", names, "--workers", "0", "--device", "cpu", "--no-progress"],
                   cli_subprocess_env(tmp_path / "torch-home"))
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)["label_issues"]
    assert_planted_first(found, planted)
    assert found["names"] == {"blue": "Sky", "green": "Leaf", "red": "Rose"}  # --category-names over the checkpoint's
    for name in ("inspect.json", "pairs.csv", "inspect.html", "label_issues.csv", "label_issues.png"):
        assert str(out / name) in done.stderr
    assert json.loads((out / "inspect.json").read_text(encoding="utf-8"))["label_issues"] == found
    with open(out / "label_issues.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == found["issues"] and rows[0]["rank"] == "1"
    assert {(r["given_name"], r["suggested_name"]) for r in rows[:2]} == {("Leaf", "Rose"), ("Rose", "Sky")}
    assert (out / "label_issues.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    page = (out / "inspect.html").read_text(encoding="utf-8")
    assert "<h2>Label issues</h2>" in page and 'id="label-issues"' in page and "planted_blue.png" in page

    again = invoke(["inspect", planted, "--label-issues", "--checkpoint", backbones["checkpoint"], "--output", out])
    assert again.exit_code == 6
    assert_one_line_error(again.stderr, "already holds inspect.json", "label_issues.csv", "--force")


@pytest.mark.parametrize("args, code, fragment", [
    (["--label-issues"], 2, "--label-issues needs a backbone: --checkpoint CKPT, or --arch ARCH and --weights W"),
    (["--checkpoint", "CKPT", "--category-names", "names.json"], 2, "--category-names: only used with --label-issues"),
    (["--arch", "resnet18", "--folds", "3"], 2, "--arch and --weights go together"),
    (["--label-issues", "--arch", "resnet18"], 2, "--arch and --weights go together"),
    (["--label-issues", "--weights", "none"], 2, "--arch and --weights go together"),
    (["--label-issues", "--checkpoint", "CKPT", "--arch", "resnet18"], 2, "--checkpoint brings its own backbone"),
    (["--label-issues", "--checkpoint", "CKPT", "--image-size", "64"], 2, "drop --arch, --weights and --image-size"),
    (["--label-issues", "--checkpoint", "CKPT", "--folds", "1"], 2, "--folds must be at least 2, got 1"),
    (["--label-issues", "--checkpoint", "CKPT", "--device", "tpu"], 2, "--device must be auto, cpu"),
    (["--label-issues", "--arch", "nonet", "--weights", "none"], 2, "unknown --arch 'nonet'"),
    (["--label-issues", "--checkpoint", "MISSING"], 4, "checkpoint not found"),
    (["--label-issues", "--arch", "resnet18", "--weights", "MISSING"], 5, "weights file not found"),
], ids=["no-backbone", "names-without-label-issues", "arch-without-weights", "arch-alone", "weights-alone", "both",
        "image-size", "folds", "device", "unknown-arch", "missing-checkpoint", "missing-weights"])
def test_bad_flags_are_one_line_and_their_exit_code(args, code, fragment, planted, backbones, tmp_path):
    values = {"CKPT": backbones["checkpoint"], "MISSING": tmp_path / "nope.pt"}
    done = invoke(["inspect", planted, *(values.get(a, a) for a in args)])
    assert done.exit_code == code, done.output
    assert_one_line_error(done.stderr, fragment)


def test_a_class_with_one_image_is_one_line_saying_what_to_do(backbones, tmp_path):
    root = write_colour_folder(tmp_path / "data", {"red": 1})
    done = invoke(["inspect", root, "--label-issues", "--checkpoint", backbones["checkpoint"], "--workers", "0"])
    assert done.exit_code == 3, done.output
    assert_one_line_error(done.stderr, "needs at least 2 readable images in every class; red has fewer",
                          "move its folder out of DATA_DIR")


def test_without_cleanlab_label_issues_is_one_line_naming_the_extra(planted, backbones, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name.split(".")[0] == "cleanlab" else real(name, *args))
    done = invoke(["inspect", planted, "--label-issues", "--checkpoint", backbones["checkpoint"]])
    assert done.exit_code == 2
    assert_one_line_error(done.stderr, "cleanlab is not installed", "pip install 'cnnkit[labels]'")
    assert invoke(["inspect", planted]).exit_code == 0  # without --label-issues cleanlab is not needed


def test_without_matplotlib_the_csv_is_still_written(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "cnnkit.plots", None)  # import fails as if not installed
    suspect = {"rank": 1, "path": "x.png", "split": "all", "given": "a", "suggested": "b", "p_given": 0.1,
               "p_suggested": 0.9}
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        written = write_files({"names": {"a": "Ant"}, "suspects": [suspect]}, str(tmp_path))
    assert written == [str(tmp_path / "label_issues.csv")] and "matplotlib is not installed" in caplog.text
    with open(written[0], newline="", encoding="utf-8") as handle:
        assert next(csv.DictReader(handle))["given_name"] == "Ant"
