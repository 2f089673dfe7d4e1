"""Test-time augmentation (issue 12): the views (cnnkit.data.transforms.tta_views), their average
in Predictor.probabilities, and --tta in predict, evaluate (stored with the calibration) and serve."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from cnnkit.config import EvaluateConfig
from cnnkit.data.transforms import tta_views
from cnnkit.evaluate import evaluate
from cnnkit.inference.predictor import Predictor
from cnnkit.models.checkpoint import load_checkpoint

from helpers import run_cli


def test_the_views_are_the_image_its_mirror_and_every_quarter_turn():
    image = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32).reshape(1, 1, 2, 2)
    assert len(tta_views(image, "none")) == 1 and tta_views(image, "none")[0] is image
    plain, mirror = tta_views(image, "flip")
    assert mirror.flatten().tolist() == [2.0, 1.0, 4.0, 3.0]
    views = tta_views(image, "flip+rot90")
    corners = {tuple(v.flatten().tolist()) for v in views}
    # the 8 symmetries of a square: 4 turns of the image and 4 of its mirror, all different
    assert len(views) == 8 and len(corners) == 8
    assert (3.0, 1.0, 4.0, 2.0) in corners or (2.0, 4.0, 1.0, 3.0) in corners  # a quarter turn


class LeftRight(nn.Module):
    """Two classes scored by the top-left and the top-right pixel of the first channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(torch.stack([x[:, 0, 0, 0], x[:, 0, 0, -1]], dim=1), dim=1)


def test_tta_averages_the_views_logits_by_hand(trained):
    predictor = Predictor(str(trained.best), device="cpu", tta="flip")
    predictor.model = LeftRight()
    batch = torch.zeros(2, 3, 4, 4)
    batch[0, 0, 0, 0], batch[0, 0, 0, -1] = 2.0, 0.0  # left 2, right 0: alone, p(left) = e^2 / (e^2 + 1)
    batch[1, 0, 0, 0], batch[1, 0, 0, -1] = 1.0, 1.0
    alone = Predictor(str(trained.best), device="cpu", tta="none")
    alone.model = LeftRight()
    assert alone.probabilities(batch)[0, 0].item() == pytest.approx(math.exp(2) / (math.exp(2) + 1))
    # flipped, left and right swap: the mean of the two views' log-probabilities is the same for
    # both classes, so TTA answers 1/2 each: a mirror-symmetric model of a mirrored scene
    np.testing.assert_allclose(predictor.probabilities(batch), np.full((2, 2), 0.5), rtol=1e-6)


def test_tta_on_a_trained_model_is_the_renormalised_mean_of_the_views(trained, image_folder):
    from cnnkit.data.transforms import load_image

    paths = sorted((image_folder / "valid").rglob("*.png"))[:4]
    plain = Predictor(str(trained.best), device="cpu")
    batch = torch.stack([plain.transform(load_image(p)) for p in paths])
    views = tta_views(batch.numpy(), "flip+rot90")
    log_probs = torch.stack([torch.from_numpy(plain.probabilities(v.copy())).log() for v in views])
    expected = torch.softmax(log_probs.mean(dim=0), dim=1).numpy()
    got = Predictor(str(trained.best), device="cpu", tta="flip+rot90").probabilities(batch)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), np.ones(len(paths)), rtol=1e-6)


def test_evaluate_stores_the_tta_it_calibrated_with_and_predict_uses_it(trained, image_folder, tmp_path, cli_env):
    checkpoint = tmp_path / "best.pt"
    shutil.copyfile(trained.best, checkpoint)
    result = evaluate(EvaluateConfig(str(checkpoint), str(image_folder), split="valid", calibrate=True, tta="flip",
                                     device="cpu", progress=False))
    stored = load_checkpoint(result.calibrated_checkpoint)
    assert result.report["tta"] == "flip" and stored.calibration["tta"] == "flip"
    assert Predictor(result.calibrated_checkpoint, device="cpu").tta == "flip"
    assert Predictor(result.calibrated_checkpoint, device="cpu", tta="none").tta == "none"  # --tta overrides it
    image = next((image_folder / "valid").rglob("*.png"))
    done = run_cli(["predict", str(image), "-c", result.calibrated_checkpoint, "--tta", "flip+rot90", "--top-k", "3",
                    "--format", "json"], cli_env)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert sum(g["probability"] for g in row["predictions"]) == pytest.approx(1.0, abs=1e-5)
    bad = run_cli(["predict", str(image), "-c", str(trained.best), "--tta", "mirror"], cli_env)
    assert bad.returncode == 2 and "--tta" in bad.stderr


def test_serve_scores_with_the_tta_asked_for(trained, image_folder, monkeypatch):
    pytest.importorskip("flask")
    from cnnkit.data.transforms import load_image
    from cnnkit.serve import create_app

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    image = next((image_folder / "valid").rglob("*.png"))
    app = create_app(trained.best, tta="flip", top_k=3, torch_threads=1, device="cpu")
    try:
        client = app.test_client()
        assert client.get("/metadata").get_json()["serving"]["tta"] == "flip"
        answer = client.post("/predict", data={"image": (open(image, "rb"), image.name)}, content_type="multipart/form-data")
        assert answer.status_code == 200, answer.get_data(as_text=True)
        served = {p["label"]: p["probability"] for p in answer.get_json()["results"][0]["predictions"]}
    finally:
        app.extensions["cnnkit"].close()
    flipped = Predictor(str(trained.best), device="cpu", tta="flip")
    expected = flipped.probabilities(flipped.transform(load_image(image))[None])[0]
    assert served == pytest.approx({c: round(p, 6) for c, p in zip(flipped.classes, expected.tolist())}, abs=1e-5)
