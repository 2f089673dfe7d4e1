"""Open-set "unknown": feature statistics at train time, the Mahalanobis and combined scores,
evaluate --unknown (AUROC, FPR at 95% TPR), predict --abstain and serve on the combined score."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.evaluate import auroc, fpr_at_tpr
from cnnkit.models.build import build_model, head_module
from cnnkit.models.checkpoint import format_description, load_checkpoint
from cnnkit.models.exported import checkpoint_from_metadata, export_metadata, onnx_props, parse_onnx_props
from cnnkit.models.openset import (
    MAX_FEATURES,
    OpenSetScorer,
    capture_features,
    background_fit,
    check_open_set,
    gaussian_fit,
    open_set_from_json,
    open_set_to_json,
)
from helpers import make_split_folder, run_cli, tiny_train_config

ARCHS = ["resnet18", "densenet121", "vgg11", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf"]

# --- the scores, by hand ------------------------------------------------------------------------


def test_mahalanobis_distance_of_a_hand_made_2d_example():
    # Class 0 around (0, 0), class 1 around (4, 0); within-class scatter diag(16, 4) over
    # 8 - 2 degrees of freedom: covariance diag(16/6, 4/6).
    spread = torch.tensor([[-2.0, 0], [2, 0], [0, -1], [0, 1]])
    features = torch.cat([spread, spread + torch.tensor([4.0, 0])])
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    means, factor = gaussian_fit(features, targets, 2, ridge=0.0)
    assert means.tolist() == [[0, 0], [4, 0]]
    assert torch.allclose(factor.T @ factor, torch.diag(torch.tensor([6 / 16, 6 / 4])), atol=1e-6)
    scorer = OpenSetScorer({"means": means, "precision_factor": factor,
                            "confidence": {"mean": 0.5, "std": 0.25}, "distance": {"mean": 1.0, "std": 0.5}})
    # (1, 1): nearer class 0, sqrt(1 * 6/16 + 1 * 6/4); (3, -2): nearer class 1, sqrt(6/16 + 4 * 6/4)
    distance = scorer.distances(torch.tensor([[1.0, 1.0], [3.0, -2.0]]))
    assert distance.tolist() == pytest.approx([math.sqrt(1.875), math.sqrt(6.375)], rel=1e-6)
    # z(confidence) - z(distance): (0.75 - 0.5) / 0.25 - (sqrt(1.875) - 1) / 0.5
    known = scorer.known_scores(np.array([0.75]), distance[:1].numpy())
    assert known[0] == pytest.approx(1 - (math.sqrt(1.875) - 1) / 0.5)


def test_relative_mahalanobis_distance_of_the_same_example():
    # The background: one Gaussian of all 8 points, mean (2, 0), covariance diag(48/8, 4/8).
    spread = torch.tensor([[-2.0, 0], [2, 0], [0, -1], [0, 1]])
    features = torch.cat([spread, spread + torch.tensor([4.0, 0])])
    means, factor = gaussian_fit(features, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 2, ridge=0.0)
    background_mean, background_factor = background_fit(features, ridge=0.0)
    assert background_mean.tolist() == [2, 0]
    assert torch.allclose(background_factor.T @ background_factor, torch.diag(torch.tensor([1 / 6, 2.0])), atol=1e-6)
    scorer = OpenSetScorer({"means": means, "precision_factor": factor, "background_mean": background_mean,
                            "background_factor": background_factor})
    # squared distance to the nearest class (1.875 and 6.375, as above) less that to the background:
    # (1, 1): 1/6 + 1 * 2; (3, -2): 1/6 + 4 * 2
    distance = scorer.distances(torch.tensor([[1.0, 1.0], [3.0, -2.0]]))
    assert distance.tolist() == pytest.approx([1.875 - 13 / 6, 6.375 - 49 / 6], rel=1e-6)
    # the ridge is relative to the mean variance: 0.5 * (6 + 0.5) / 2 added to each
    _, ridged = background_fit(features, ridge=0.5)
    assert torch.allclose(ridged.T @ ridged, torch.diag(1 / torch.tensor([6 + 1.625, 0.5 + 1.625])), atol=1e-6)


def test_auroc_and_fpr_at_95_tpr_of_a_hand_computed_example():
    known, unknown = np.array([0.9, 0.8, 0.4]), np.array([0.5, 0.3])
    assert auroc(known, unknown) == pytest.approx(5 / 6)  # 5 of the 6 pairs ordered right
    assert auroc(np.array([0.5, 0.7]), np.array([0.5])) == pytest.approx(0.75)  # a tie counts half
    assert auroc(np.array([1.0]), np.array([0.0])) == 1.0
    # 95% of 3 known images keeps all 3: threshold 0.4, which accepts 0.5 of the unknown
    assert fpr_at_tpr(known, unknown) == pytest.approx(0.5)
    assert fpr_at_tpr(np.arange(100.0), np.array([4.0, 5.0, 50.0])) == pytest.approx(2 / 3)  # threshold 5


def test_auroc_matches_sklearn_where_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    known, unknown = rng.normal(1, 1, 50).round(1), rng.normal(0, 1, 40).round(1)
    labels = np.r_[np.ones(50), np.zeros(40)]
    assert auroc(known, unknown) == pytest.approx(metrics.roc_auc_score(labels, np.r_[known, unknown]))


# --- features of every family ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_penultimate_features_are_the_heads_input_for_every_family(arch):
    torch.manual_seed(0)
    model, spec = build_model(arch, 3, "none", hidden_units=8)
    model.eval()
    with capture_features(model, arch) as seen, torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    (features,) = seen
    assert features.shape == (2, min(spec.in_features, MAX_FEATURES)) and features.dtype == torch.float64
    assert torch.isfinite(features).all()
    assert not head_module(model, arch)._forward_pre_hooks  # the hook is gone once the block ends


# --- statistics stored with the model -----------------------------------------------------------


def test_training_stores_the_statistics_and_they_round_trip(trained, tmp_path):
    ckpt = load_checkpoint(trained.best)
    stats = check_open_set(ckpt.open_set, len(ckpt.classes))
    assert stats is not None and stats["images"] == 18  # the training images (6 of each of 3 classes)
    assert stats["means"].dtype == torch.float32 and stats["precision_factor"].shape == (512, 512)
    ckpt.save(tmp_path / "copy.pt")
    again = load_checkpoint(tmp_path / "copy.pt").open_set  # weights_only=True
    assert torch.equal(again["means"], stats["means"]) and torch.equal(again["precision_factor"], stats["precision_factor"])
    # through an export's JSON metadata
    props = onnx_props(export_metadata(ckpt))
    exported = checkpoint_from_metadata(parse_onnx_props(props), "model.onnx").open_set
    assert all(torch.equal(exported[k], stats[k]) for k in ("precision_factor", "background_mean", "background_factor"))
    assert exported["distance"] == stats["distance"] and exported["confidence"] == stats["confidence"]
    assert open_set_from_json(open_set_to_json(None)) is None and open_set_from_json({"means": 1}) is None
    assert "open set     stored" in format_description({**_info(trained.best)})


def test_version_1_statistics_keep_the_plain_distance(trained):
    stats = load_checkpoint(trained.best).open_set
    old = {k: v for k, v in stats.items() if not k.startswith("background")} | {"version": 1}
    assert check_open_set(old, 3) is not None
    again = open_set_from_json(json.loads(json.dumps(open_set_to_json(old))))
    assert set(again) == set(old) and torch.equal(again["precision_factor"], old["precision_factor"])
    features = torch.randn(4, 512, dtype=torch.float64)
    plain = OpenSetScorer(again).distances(features)
    whitened = (features @ old["precision_factor"].double().T)[:, None] - (old["means"].double() @ old["precision_factor"].double().T)
    assert torch.allclose(plain, whitened.pow(2).sum(2).min(1).values.sqrt())
    assert not torch.allclose(OpenSetScorer(stats).distances(features), plain)


def _info(path: Path) -> dict:
    from cnnkit.models.checkpoint import describe

    return describe(path)


def test_statistics_that_are_not_a_dict_make_a_damaged_checkpoint(trained, tmp_path):
    from cnnkit.errors import CheckpointError

    payload = torch.load(trained.best, weights_only=True)
    payload["open_set"] = torch.zeros(3)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="open_set must be a dict"):
        load_checkpoint(tmp_path / "bad.pt")


def test_damaged_statistics_are_ignored_with_a_warning(caplog):
    assert check_open_set({"version": 1, "means": torch.zeros(3, 4), "precision_factor": torch.eye(5)}, 3) is None
    assert check_open_set({"version": 99}, 3) is None
    standardised = {"confidence": {"mean": 0.5, "std": 0.1}, "distance": {"mean": 1.0, "std": 0.2}}
    v2 = {"version": 2, "means": torch.zeros(3, 4), "precision_factor": torch.eye(4), **standardised}
    assert check_open_set(v2, 3) is None  # version 2 without its background
    assert check_open_set({**v2, "background_mean": torch.zeros(4), "background_factor": torch.eye(3)}, 3) is None
    assert check_open_set({**v2, "background_mean": torch.zeros(4), "background_factor": torch.eye(4)}, 3) is not None
    assert "open-set statistics are not usable" in caplog.text


# --- end to end: a planted unknown folder -------------------------------------------------------


def grey_stripes(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.full((height, width, 3), 40, dtype=np.uint8)
    pixels[:: 4 + seed % 3] = 210
    pixels += rng.integers(0, 20, pixels.shape).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny run on red/green/blue noise and a folder of grey stripes it never saw."""
    from cnnkit.training import train

    root = tmp_path_factory.mktemp("open-set")
    data = make_split_folder(root / "data", seed=3)
    unknown = root / "unknown"
    unknown.mkdir()
    for i in range(6):
        grey_stripes(i).save(unknown / f"stripes_{i}.png")
    torch.manual_seed(0)
    train(tiny_train_config(data, root / "run", epochs=3))
    return root, data, unknown


def test_evaluate_unknown_reports_auroc_and_predict_abstains_on_the_combined_score(planted, cli_env):
    root, data, unknown = planted
    best = root / "run" / "best.pt"
    result = run_cli(["evaluate", best, data, "--split", "valid", "--unknown", unknown, "--target-coverage", "0.8",
                      "--device", "cpu", "--no-progress", "--json", "--output", root / "report"], cli_env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    found = report["unknown"]
    assert found["images"] == 6
    assert set(found) >= {"confidence", "distance", "combined"}
    assert found["combined"]["auroc"] >= 0.9 and 0 <= found["combined"]["fpr_at_95_tpr"] <= 1
    assert json.loads((root / "report" / "report.json").read_text())["unknown"]["combined"] == found["combined"]
    assert report["abstain_combined"]["unknown_rejected"] == 1.0
    calibrated = load_checkpoint(root / "run" / "best.calibrated.pt")
    assert calibrated.calibration["unknown_threshold"] == pytest.approx(report["abstain_combined"]["threshold"])
    assert calibrated.calibration["abstain_threshold"] == pytest.approx(report["abstain"]["threshold"])

    result = run_cli(["predict", unknown / "stripes_0.png", data / "valid", "-c", root / "run" / "best.calibrated.pt",
                      "--abstain", "--format", "jsonl", "--device", "cpu", "--no-progress"], cli_env)
    assert result.returncode == 0, result.stderr
    rows = {Path(r["path"]).name: r["predicted"] for r in map(json.loads, result.stdout.splitlines())}
    assert rows.pop("stripes_0.png") == "unknown"
    assert sum(label != "unknown" for label in rows.values()) >= 4  # 80% of the 6 known images kept


def test_serve_answers_say_whether_each_image_is_unknown(planted):
    from cnnkit.serve import create_app

    root, data, unknown = planted
    app = create_app(str(root / "run" / "best.calibrated.pt"), torch_threads=1)
    try:
        known = next((data / "valid" / "red").iterdir()).read_bytes()
        images = [base64.b64encode(b).decode() for b in (known, (unknown / "stripes_1.png").read_bytes())]
        answer = app.test_client().post("/predict", json={"images": images})
        assert answer.status_code == 200, answer.get_data(as_text=True)
        assert [r["unknown"] for r in answer.get_json()["results"]] == [False, True]
    finally:
        app.extensions["cnnkit"].close()


def test_a_checkpoint_without_statistics_keeps_the_confidence_threshold(planted, trained, tmp_path):
    from cnnkit.config import EvaluateConfig, PredictConfig
    from cnnkit.evaluate import evaluate
    from cnnkit.inference.predict import predict

    root, data, unknown = planted
    ckpt = load_checkpoint(root / "run" / "best.pt")
    ckpt.open_set = None
    ckpt.calibration = {"abstain_threshold": 0.5, "unknown_threshold": 0.0}
    old = tmp_path / "old.pt"
    ckpt.save(old)
    report = evaluate(EvaluateConfig(str(old), str(data), split="valid", unknown=str(unknown), device="cpu",
                                     progress=False)).report
    assert set(report["unknown"]) == {"data", "images", "unreadable", "confidence"}
    rows = list(predict(PredictConfig(checkpoint=str(old), inputs=(str(data / "valid"),), abstain=True,
                                      device="cpu", progress=False)))
    assert rows and all(r.abstained == (r.top[0].probability < 0.5) and r.known_score is None for r in rows)
    # and an export falls back to confidence too (the features are not in its graph)
    meta = export_metadata(load_checkpoint(root / "run" / "best.pt"))
    assert checkpoint_from_metadata(json.loads(json.dumps(meta)), "model.onnx").open_set is not None


def test_unknown_needs_a_folder(planted, tmp_path):
    from cnnkit.config import EvaluateConfig
    from cnnkit.errors import DataError
    from cnnkit.evaluate import evaluate

    root, data, _ = planted
    with pytest.raises(DataError, match="--unknown"):
        evaluate(EvaluateConfig(str(root / "run" / "best.pt"), str(data), split="valid",
                                unknown=str(tmp_path / "missing"), device="cpu", progress=False))
