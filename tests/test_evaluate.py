"""cnnkit.evaluate: metrics against a hand-computed example, calibration, abstention, reports."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil

import numpy as np
import pytest

from cnnkit.config import EvaluateConfig
from cnnkit.errors import ConfigError, DataError, OutputError
from cnnkit.evaluate import (
    abstain_threshold,
    classification_report,
    evaluate,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    softmax_with_temperature,
)

from helpers import CLASSES, assert_one_line_error, run_cli

# Seven images, three classes. Worked out by hand:
#   predicted     0    1    0    2    1    0    1
#   true          0    1    1    2    2    0    2
#   confidence   .7   .8   .6   .6   .6   .9   .5
#   confusion (rows true): [[2,0,0],[1,1,0],[0,2,1]]
#   precision 2/3, 1/3, 1     recall 1, 1/2, 1/3     F1 0.8, 0.4, 0.5
PROBS = np.array([
    [0.7, 0.2, 0.1],
    [0.1, 0.8, 0.1],
    [0.6, 0.3, 0.1],
    [0.2, 0.2, 0.6],
    [0.3, 0.6, 0.1],
    [0.9, 0.05, 0.05],
    [0.2, 0.5, 0.3],
])
TARGETS = np.array([0, 1, 1, 2, 2, 0, 2])
LABELS = ["a", "b", "c"]


def test_report_matches_the_hand_computed_example():
    report = classification_report(PROBS, TARGETS, LABELS, top_k=2)
    assert report["accuracy"] == pytest.approx(4 / 7)
    # top-2 misses only image 4 (true class at 0.1, behind 0.6 and 0.3)
    assert report["top_k_accuracy"] == pytest.approx(6 / 7)
    assert report["confusion_matrix"] == [[2, 0, 0], [1, 1, 0], [0, 2, 1]]
    per_class = {row["label"]: row for row in report["per_class"]}
    assert [per_class[c]["precision"] for c in LABELS] == pytest.approx([2 / 3, 1 / 3, 1.0])
    assert [per_class[c]["recall"] for c in LABELS] == pytest.approx([1.0, 1 / 2, 1 / 3])
    assert [per_class[c]["f1"] for c in LABELS] == pytest.approx([0.8, 0.4, 0.5])
    assert [per_class[c]["support"] for c in LABELS] == [2, 2, 3]
    assert report["macro_avg"]["f1"] == pytest.approx((0.8 + 0.4 + 0.5) / 3)
    assert report["weighted_avg"]["f1"] == pytest.approx((2 * 0.8 + 2 * 0.4 + 3 * 0.5) / 7)
    assert report["macro_avg"]["precision"] == pytest.approx((2 / 3 + 1 / 3 + 1) / 3)
    assert report["most_confused"][0] == {"true": "c", "predicted": "b", "count": 2}


def test_nll_and_ece_match_the_hand_computed_example():
    nll = -(math.log(0.7) + math.log(0.8) + math.log(0.3) + math.log(0.6) + math.log(0.1)
            + math.log(0.9) + math.log(0.3)) / 7
    assert negative_log_likelihood(PROBS, TARGETS) == pytest.approx(nll)
    # 15 bins: .7, .8, .9 and .5 are alone in their bins (gaps .3, .2, .1, .5); the three .6
    # share one bin with accuracy 1/3 (gap .6 - 1/3, weight 3/7).
    expected = (0.3 + 0.2 + 0.1 + 0.5) / 7 + 3 / 7 * (0.6 - 1 / 3)
    confidence = PROBS.max(axis=1)
    correct = PROBS.argmax(axis=1) == TARGETS
    assert expected_calibration_error(confidence, correct) == pytest.approx(expected)
    assert classification_report(PROBS, TARGETS, LABELS)["ece"] == pytest.approx(expected)


def test_ece_is_zero_for_a_perfectly_calibrated_bin():
    confidence = np.full(10, 0.7)
    correct = np.array([True] * 7 + [False] * 3)
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.0)


def test_abstain_threshold_keeps_the_target_share_counting_ties():
    confidence = PROBS.max(axis=1)
    correct = PROBS.argmax(axis=1) == TARGETS
    result = abstain_threshold(confidence, correct, 0.5)
    # the 4th most confident is 0.6; the three 0.6 ties all stay: 6 of 7 kept, 4 of them right
    assert result["threshold"] == pytest.approx(0.6)
    assert result["coverage"] == pytest.approx(6 / 7)
    assert result["accuracy_kept"] == pytest.approx(4 / 6)
    assert abstain_threshold(confidence, correct, 1.0)["coverage"] == 1.0


def test_fitted_temperature_minimises_nll_and_cools_an_overconfident_model():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3))
    logits[np.arange(300), targets] += 1.0  # some signal...
    log_probs = np.log(softmax_with_temperature(logits * 4, 1.0))  # ...made 4x overconfident
    t = fit_temperature(log_probs, targets)
    assert t > 2.0

    def nll(temp):
        return negative_log_likelihood(softmax_with_temperature(log_probs, temp), targets)

    assert nll(t) <= nll(t * 1.05) and nll(t) <= nll(t / 1.05)
    assert nll(t) < nll(1.0)


# --- evaluate() on a trained checkpoint -------------------------------------------------------


def _cfg(trained, folder, **kw) -> EvaluateConfig:
    values = dict(checkpoint=str(trained.best), data_dir=str(folder), split="valid", workers=0,
                  device="cpu", progress=False)
    values.update(kw)
    return EvaluateConfig(**values)


def test_evaluate_writes_consistent_report_files(trained, image_folder, tmp_path):
    out = tmp_path / "report"
    result = evaluate(_cfg(trained, image_folder, output=str(out)))
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "confusion_matrix.csv", "predictions.csv", "confusion_matrix.png",
            "reliability.png"} <= names
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == report["images"] == 3 * 2
    assert report["accuracy"] == pytest.approx(sum(r["true"] == r["predicted"] for r in rows) / len(rows))
    with open(out / "confusion_matrix.csv", newline="") as handle:
        matrix = [[int(v) for v in row[1:]] for row in list(csv.reader(handle))[1:]]
    assert matrix == report["confusion_matrix"] == result.report["confusion_matrix"]
    assert sum(map(sum, matrix)) == 6
    assert [c["label"] for c in report["classes"]] == list(CLASSES)


def test_report_folder_is_not_overwritten_without_force(trained, image_folder, tmp_path):
    out = tmp_path / "report"
    evaluate(_cfg(trained, image_folder, output=str(out)))
    before = (out / "report.json").read_bytes()
    with pytest.raises(OutputError, match="--force"):
        evaluate(_cfg(trained, image_folder, output=str(out)))
    assert (out / "report.json").read_bytes() == before
    evaluate(_cfg(trained, image_folder, output=str(out), force=True))


def test_unknown_and_missing_classes_are_errors_unless_ignored(trained, image_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_folder / "valid", data / "valid")
    shutil.copytree(data / "valid" / "red", data / "valid" / "purple")
    with pytest.raises(DataError, match="purple"):
        evaluate(_cfg(trained, data))
    result = evaluate(_cfg(trained, data, ignore_unknown=True))
    assert result.report["images"] == 6
    shutil.rmtree(data / "valid" / "purple")
    shutil.rmtree(data / "valid" / "green")
    with pytest.raises(DataError, match="green"):
        evaluate(_cfg(trained, data))
    assert evaluate(_cfg(trained, data, ignore_unknown=True)).report["images"] == 4


def test_test_folder_is_the_default_split(trained, image_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_folder / "valid", data / "test")
    shutil.copytree(image_folder / "train", data / "train")
    result = evaluate(_cfg(trained, data, split=None))
    assert result.report["data"].endswith("test") and result.report["images"] == 6


def test_calibration_is_stored_in_a_new_file_and_used_by_predict(trained, image_folder, tmp_path):
    from cnnkit.inference.predictor import Predictor
    from cnnkit.models.checkpoint import load_checkpoint

    ckpt = tmp_path / "best.pt"
    shutil.copy(trained.best, ckpt)
    original = ckpt.read_bytes()
    result = evaluate(_cfg(trained, image_folder, checkpoint=str(ckpt), calibrate=True, target_coverage=0.5))
    calibrated = tmp_path / "best.calibrated.pt"
    assert result.calibrated_checkpoint == str(calibrated)
    assert ckpt.read_bytes() == original  # the user's checkpoint is untouched
    stored = load_checkpoint(calibrated).calibration
    assert stored["temperature"] == pytest.approx(result.report["calibration"]["temperature"])
    assert stored["abstain_threshold"] == pytest.approx(result.report["abstain"]["threshold"])
    assert "ece_before" in result.report["calibration"] and "ece_after" in result.report["calibration"]

    image = sorted((image_folder / "valid" / "red").iterdir())[0]
    plain = next(Predictor(str(ckpt), "cpu").score_paths([str(image)]))[1]
    scaled = next(Predictor(str(calibrated), "cpu").score_paths([str(image)]))[1]
    t = stored["temperature"]
    expected = softmax_with_temperature(np.log(plain[None].astype(np.float64)), t)[0]
    assert scaled == pytest.approx(expected, abs=1e-5)

    with pytest.raises(OutputError, match="--force"):  # a second calibration does not overwrite
        evaluate(_cfg(trained, image_folder, checkpoint=str(ckpt), calibrate=True))
    evaluate(_cfg(trained, image_folder, checkpoint=str(ckpt), calibrate=True, force=True))
    assert load_checkpoint(ckpt).temperature == pytest.approx(t, rel=1e-3)


def test_evaluate_cli_prints_the_table_and_fails_cleanly(trained, image_folder, cli_env, tmp_path):
    done = run_cli(["evaluate", str(trained.best), str(image_folder), "--split", "valid", "--workers", "0",
                    "--no-progress"], cli_env)
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout and "Red rose" in done.stdout and "confusion matrix" in done.stdout
    missing = run_cli(["evaluate", str(trained.best), str(tmp_path / "nope")], cli_env)
    assert missing.returncode == 3
    assert_one_line_error(missing.stderr, "not found")


def test_calibrating_an_onnx_export_is_refused_before_scoring(tmp_path):
    model = tmp_path / "model.onnx"  # never opened: the options are refused first
    with pytest.raises(ConfigError, match="evaluate the .pt checkpoint"):
        evaluate(EvaluateConfig(checkpoint=str(model), data_dir=str(tmp_path), calibrate=True))


@pytest.mark.skipif(os.name != "posix", reason="file names as bytes")
def test_report_files_keep_names_that_are_not_utf8_or_hold_a_carriage_return(trained, image_folder, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(image_folder / "valid", folder / "valid")
    first, second = sorted((folder / "valid" / CLASSES[0]).iterdir())[:2]
    raw = os.fsencode(first.parent) + b"/caf\xe9.png"  # a name from an old archive
    os.rename(os.fsencode(first), raw)
    second.rename(second.with_name("two\rlines.png"))
    out = tmp_path / "report"
    evaluate(_cfg(trained, folder, output=str(out)))
    data = (out / "predictions.csv").read_bytes()
    assert raw in data and b'"' + os.fsencode(second.with_name("two\rlines.png")) + b'"' in data
    with open(out / "predictions.csv", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and os.fsdecode(raw) in {r["path"] for r in rows}
    json.loads((out / "report.json").read_bytes().decode("utf-8", "surrogateescape"))


def test_a_folder_as_the_checkpoint_is_one_line_exit_4(image_folder, cli_env, tmp_path):
    for command in (["evaluate", str(tmp_path), str(image_folder)], ["export", str(tmp_path)],
                    ["serve", str(tmp_path)]):
        done = run_cli(command, cli_env)
        assert done.returncode == 4, (command, done.stderr)
        assert_one_line_error(done.stderr, "folder")
