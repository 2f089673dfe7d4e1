"""cnnkit explain: Grad-CAM and Grad-CAM++ heat maps (the target layer of every architecture
family, a planted case, the hand-computed Grad-CAM++), the command end to end, and the heat
maps of evaluate's gallery."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

pytest.importorskip("captum")

from cnnkit.cli import main  # noqa: E402
from cnnkit.config import EXPLAIN_METHODS, EvaluateConfig, ExplainConfig  # noqa: E402
from cnnkit.errors import ConfigError  # noqa: E402
from cnnkit.evaluate import evaluate  # noqa: E402
from cnnkit.explain import explain  # noqa: E402
from cnnkit.inference.cam import HeatMapper, grad_cam_pp, scale_maps  # noqa: E402
from cnnkit.inference.predictor import Predictor  # noqa: E402
from cnnkit.models.build import arch_families, build_model, cam_layer, head_module, list_archs  # noqa: E402

from deploy_helpers import CLASSES, NAMES, make_checkpoint, random_image  # noqa: E402
from helpers import assert_one_line_error, run_cli, write_corrupt_files  # noqa: E402

# The smallest architecture of each family: the per-family test builds each one.
SMALLEST = {
    "alexnet": "alexnet",
    "convnext": "convnext_tiny",
    "densenet": "densenet121",
    "efficientnet": "efficientnet_b0",
    "mnasnet": "mnasnet0_5",
    "mobilenet": "mobilenet_v3_small",
    "regnet": "regnet_x_400mf",
    "resnet": "resnet18",
    "resnext": "resnext50_32x4d",
    "shufflenet": "shufflenet_v2_x0_5",
    "vgg": "vgg11",
    "wide_resnet": "wide_resnet50_2",
}


def invoke(args: list) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="cnnkit")


# --- the maths ------------------------------------------------------------------------------


def test_grad_cam_pp_matches_the_hand_computed_case():
    # channel 0: A = [1, 3], g = [1, 2]; ΣA = 4; alpha = 1/(2+4) and 4/(8+32); w = 1/6 + 0.2
    # channel 1: negative gradients only: relu(g) = 0, so it weighs nothing
    activations = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]]])
    gradients = torch.tensor([[[[1.0, 2.0]], [[-1.0, -1.0]]]])
    weight = 1 / 6 + 0.2
    assert grad_cam_pp(activations, gradients)[0, 0, 0].tolist() == pytest.approx([weight * 1, weight * 3])
    # a position with no gradient (0/0 in alpha) contributes nothing, and is not NaN
    out = grad_cam_pp(torch.ones(1, 1, 1, 2), torch.tensor([[[[0.0, 1.0]]]]))
    assert torch.isfinite(out).all() and out[0, 0, 0].tolist() == pytest.approx([1 / 4, 1 / 4])


def test_maps_are_scaled_to_0_1_and_a_flat_map_is_all_zero():
    maps = torch.stack([torch.arange(4.0).view(2, 2) + 5, torch.full((2, 2), 3.0)])
    scaled = scale_maps(maps)
    assert scaled[0].flatten().tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert scaled[1].eq(0).all()


class Planted(nn.Module):
    """resnet-shaped by name (layer4, fc), built by hand: layer4 finds red (channel 0) and blue
    (channel 1) in each 8x8 block; class 0 (red) is the mean redness, class 1 the mean blueness.
    So the class depends only on where those colours are."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 2, kernel_size=8, stride=8, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0], conv.weight[0, 1:] = 1 / 64, -1 / 64
            conv.weight[1, 2], conv.weight[1, :2] = 1 / 64, -1 / 64
        self.layer4 = nn.Sequential(conv, nn.ReLU())
        self.fc = nn.Sequential(nn.Linear(2, 2), nn.LogSoftmax(dim=1))
        with torch.no_grad():
            self.fc[0].weight.copy_(torch.eye(2))
            self.fc[0].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer4(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("method", EXPLAIN_METHODS)
def test_the_map_is_high_where_the_evidence_for_the_class_is(method):
    image = torch.zeros(1, 3, 64, 96)  # (H, W): not square, so rows and columns cannot swap
    image[0, 0, 8:24, 64:88] = 1.0  # red, top right
    image[0, 2, 40:56, 8:32] = 1.0  # blue, bottom left
    mapper = HeatMapper(Planted().eval(), "resnet18", method)
    red, blue = mapper.maps(image.expand(2, -1, -1, -1), [0, 1])
    assert red.shape == blue.shape == (64, 96)
    assert red[8:24, 64:88].mean() > 0.8 and red[40:56, 8:32].max() < 0.1
    assert blue[40:56, 8:32].mean() > 0.8 and blue[8:24, 64:88].max() < 0.1


# --- the target layer of every family ---------------------------------------------------------


def test_every_family_has_a_target_layer_in_every_architecture():
    assert set(SMALLEST) == set(arch_families())
    not_on_meta = []
    for arch in list_archs():
        try:
            with torch.device("meta"):  # shapes only: no weights are allocated
                model, _ = build_model(arch, 3, "none", hidden_units=8)
        except NotImplementedError:  # RegNet computes its widths from tensor values: see the next test
            not_on_meta.append(arch)
            continue
        layer = cam_layer(model, arch)
        assert not isinstance(layer, (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear)), arch
        assert any(isinstance(m, nn.Conv2d) for m in layer.modules()) or isinstance(layer, nn.ReLU), arch
    assert all(arch.startswith("regnet") for arch in not_on_meta), not_on_meta


@pytest.mark.parametrize("family", sorted(SMALLEST))
def test_every_family_gives_image_sized_finite_maps_in_0_1(family):
    torch.manual_seed(0)
    arch = SMALLEST[family]
    model, _ = build_model(arch, 3, "none", hidden_units=0)
    with torch.no_grad():  # every class excited by every feature: no map is empty by chance of random signs
        head_module(model, arch)[0].weight.uniform_(0, 1)
    batch = torch.randn(2, 3, 64, 80)
    shapes: list = []
    cam_layer(model, arch).register_forward_hook(lambda module, args, output: shapes.append(output.shape))
    for method in EXPLAIN_METHODS:
        maps = HeatMapper(model.eval(), arch, method).maps(batch, [0, 2])
        assert maps.shape == (2, 64, 80), (arch, method)
        assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1, (arch, method)
        if method == "gradcam":
            assert (maps.flatten(1).std(dim=1) > 0).all(), f"{arch}: a constant map"
        # Grad-CAM++ of random weights may find no positive evidence anywhere (ConvNeXt's features
        # are signed): its map is then rightly all 0, which says nothing about the layer.
    assert min(shapes[0][-2:]) >= 2, f"{arch}: the target layer's map is {tuple(shapes[0][-2:])} at 64 px"


# --- the command ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("explain") / "model.pt", reference=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = [folder / "first.jpg", folder / "second.png"]
    for seed, path in enumerate(paths):
        random_image(seed, size=(90, 70)).save(path)
    return paths


def test_explain_writes_one_picture_per_image_and_class(checkpoint, images, tmp_path, cli_env):
    out = tmp_path / "maps"
    done = run_cli(["explain", *images, "-c", checkpoint, "-o", out, "-k", "2", "--device", "cpu"], cli_env)
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 4 and [f.split("__")[0] for f in files] == ["first", "first", "second", "second"]
    assert {f.split("__")[1][:2] for f in files} == {"1_", "2_"}
    assert all(f.removesuffix(".png").split("_", 3)[-1] in CLASSES for f in files)
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["image", "class", "probability", "file"] and len(lines) == 5
    for line, name in zip(lines[1:], files):
        assert line.rstrip().endswith(str(out / name)) and "%" in line
    with Image.open(out / files[0]) as picture:  # image and overlay side by side, a caption band under
        assert picture.format == "PNG" and picture.width > picture.height > 300


def test_no_picture_is_overwritten_without_force(checkpoint, images, tmp_path):
    out = tmp_path / "maps"
    assert invoke(["explain", images[0], "-c", checkpoint, "-o", out, "--device", "cpu"]).exit_code == 0
    (picture,) = out.iterdir()
    picture.write_bytes(b"mine")
    again = invoke(["explain", images[0], "-c", checkpoint, "-o", out, "--device", "cpu"])
    assert again.exit_code == 6
    assert_one_line_error(again.stderr, f"{out} already holds {picture.name}; use --force")
    assert picture.read_bytes() == b"mine"
    forced = invoke(["explain", images[0], "-c", checkpoint, "-o", out, "--device", "cpu", "--force"])
    assert forced.exit_code == 0 and picture.read_bytes()[:4] == b"\x89PNG"


def test_bad_images_get_predicts_reasons_and_exit_7(checkpoint, images, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(images[0], folder / images[0].name)
    bad = write_corrupt_files(folder)
    result = invoke(["explain", folder, "-c", checkpoint, "-o", tmp_path / "maps", "--device", "cpu"])
    assert result.exit_code == 7
    assert_one_line_error(result.stderr, f"{len(bad)} of {len(bad) + 1} images could not be explained")
    assert len(list((tmp_path / "maps").iterdir())) == 1
    reasons = {p.path: p.error for p in Predictor(str(checkpoint), "cpu").predict_paths([str(p) for p in bad.values()])}
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    for path, reason in reasons.items():
        assert reason and rows[path].endswith(f"error: {reason}")


def test_target_names_a_class_by_label_or_name_whatever_its_rank(checkpoint, images, tmp_path):
    probs = Predictor(str(checkpoint), "cpu").predict_images([Image.open(images[0]).convert("RGB")], top_k=3)[0]
    last = probs[-1]
    result = explain(ExplainConfig((str(images[0]),), str(checkpoint), str(tmp_path), target=last.name, device="cpu"))
    (row,) = result.rows
    assert (row.label, row.rank) == (last.label, 3) and row.probability == pytest.approx(last.probability, abs=1e-5)
    assert Path(row.file).name == f"first__3_{last.label}.png" and Path(row.file).is_file()
    with pytest.raises(ConfigError, match="--target 'nope' is not a class of this model; its labels: cat, dog, fox"):
        explain(ExplainConfig((str(images[0]),), str(checkpoint), str(tmp_path / "other"), target="nope", device="cpu"))


@pytest.mark.parametrize("args, code, fragment", [
    (["-o", "OUT", "-c", "model.onnx"], 2, "explain the .pt checkpoint it was exported from"),
    (["-o", "OUT", "-c", "CKPT", "--target", "cat", "-k", "2"], 2, "--target explains one given class"),
    (["-o", "OUT", "-c", "CKPT", "-k", "0"], 2, "--top-k must be at least 1"),
    (["-o", "FILE", "-c", "CKPT"], 6, "cannot create --output"),
    (["-o", "OUT", "-c", "MISSING"], 4, "checkpoint not found"),
], ids=["onnx", "target-and-top-k", "top-k-0", "output-under-a-file", "missing-checkpoint"])
def test_bad_usage_is_one_line_and_its_exit_code(args, code, fragment, checkpoint, images, tmp_path):
    (tmp_path / "file").write_text("a file")
    values = {"OUT": tmp_path / "out", "FILE": tmp_path / "file" / "sub", "CKPT": checkpoint,
              "MISSING": tmp_path / "gone.pt", "model.onnx": tmp_path / "model.onnx"}
    result = invoke(["explain", images[0], *(values.get(a, a) for a in args), "--device", "cpu"])
    assert result.exit_code == code, result.output
    assert_one_line_error(result.stderr, fragment)
    assert result.stdout == ""


def _without_captum(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name.split(".")[0] == "captum" else real(name, *args))


def test_without_captum_explain_is_one_line_naming_the_extra(checkpoint, images, tmp_path, monkeypatch):
    _without_captum(monkeypatch)
    result = invoke(["explain", images[0], "-c", checkpoint, "-o", tmp_path / "out", "--device", "cpu"])
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "captum is not installed", "pip install 'cnnkit[explain]'")


# --- evaluate's gallery -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    for i, label in enumerate(CLASSES * 2):
        (root / label).mkdir(exist_ok=True)
        random_image(100 + i).save(root / label / f"{i}.png")
    return root


def _gallery_overlays(monkeypatch) -> list:
    """Make evaluate's gallery record what it is given, besides drawing it."""
    import cnnkit.plots as plots

    seen: list = []
    real = plots.gallery_png
    monkeypatch.setattr(plots, "gallery_png", lambda *a, **kw: seen.append(kw.get("overlays")) or real(*a, **kw))
    return seen


def test_evaluate_gallery_shows_heat_maps(checkpoint, labelled, tmp_path, monkeypatch):
    seen = _gallery_overlays(monkeypatch)
    result = evaluate(EvaluateConfig(str(checkpoint), str(labelled), output=str(tmp_path / "r"), device="cpu", workers=0))
    wrong = result.report["most_confident_wrong"]
    assert wrong and set(seen[0]) == {w["path"] for w in wrong}
    for overlay in seen[0].values():
        assert overlay.size == (64, 64)  # the model's crop
    assert (tmp_path / "r" / "most_confident_wrong.png").is_file()


def test_evaluate_gallery_without_captum_says_so_once_and_still_draws(checkpoint, labelled, tmp_path, monkeypatch, caplog):
    seen = _gallery_overlays(monkeypatch)
    _without_captum(monkeypatch)
    with caplog.at_level(logging.INFO, logger="cnnkit"):
        evaluate(EvaluateConfig(str(checkpoint), str(labelled), output=str(tmp_path / "r"), device="cpu", workers=0))
    assert seen == [{}] and (tmp_path / "r" / "most_confident_wrong.png").is_file()
    assert [r.getMessage() for r in caplog.records if "heat maps" in r.getMessage()] == [
        "the gallery has no heat maps: captum is not installed (pip install 'cnnkit[explain]')"
    ]


def test_names_in_the_checkpoint_are_in_the_table(checkpoint, images, tmp_path):
    result = invoke(["explain", images[1], "-c", checkpoint, "-o", tmp_path, "-k", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sum(f"{NAMES[c]} ({c})" in result.stdout for c in CLASSES) == 3
