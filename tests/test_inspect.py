"""cnnkit inspect: counts, odd images and duplicates of a data set, on tiny generated pictures
with planted cases (an exact copy across splits, a re-encoded JPEG copy, a picture under two
labels, an unreadable file, a tiny and an elongated image)."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

pytest.importorskip("imagehash")

from cnnkit.cli import main  # noqa: E402
from cnnkit.config import InspectConfig  # noqa: E402
from cnnkit.data.transforms import load_image  # noqa: E402
from cnnkit.errors import ImageError  # noqa: E402
from cnnkit.inspect_data import hamming_pairs, inspect_data  # noqa: E402

from helpers import assert_one_line_error, run_cli  # noqa: E402


def picture(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """Shapes in random colours on a random background: distinct seeds, distinct pictures."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size[0] - 8), rng.integers(0, size[1] - 8)
        box = (int(x0), int(y0), int(x0 + rng.integers(8, size[0] // 2)), int(y0 + rng.integers(8, size[1] // 2)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def make_data(root: Path) -> dict[str, Path]:
    """train/ and valid/ of cats and dogs, with the planted cases; returns the planted files."""
    for split, label, seeds in (("train", "cat", range(4)), ("train", "dog", range(4, 8)),
                                ("valid", "cat", [8]), ("valid", "dog", [9])):
        (root / split / label).mkdir(parents=True)
        for seed in seeds:
            picture(seed).save(root / split / label / f"{seed}.png")
    planted = {
        "copy": root / "valid" / "cat" / "copy.png",  # train/cat/0.png, byte for byte
        "reencoded": root / "valid" / "dog" / "reencoded.jpg",  # train/dog/4.png as a JPEG, quality 60
        "conflict": root / "train" / "dog" / "conflict.png",  # train/cat/1.png, labelled dog
        "broken": root / "train" / "cat" / "broken.jpg",
        "tiny": root / "train" / "dog" / "tiny.png",
        "long": root / "train" / "cat" / "long.png",
        "grey": root / "valid" / "cat" / "grey.png",
    }
    shutil.copy(root / "train" / "cat" / "0.png", planted["copy"])
    Image.open(root / "train" / "dog" / "4.png").save(planted["reencoded"], quality=60)
    shutil.copy(root / "train" / "cat" / "1.png", planted["conflict"])
    planted["broken"].write_bytes(b"not a picture at all")
    picture(20, (20, 20)).save(planted["tiny"])
    picture(21, (200, 40)).save(planted["long"])
    picture(22).convert("L").save(planted["grey"])
    return planted


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("inspect") / "data"
    return root, make_data(root)


def invoke(args: list) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="cnnkit")


def test_hamming_pairs_are_those_of_the_brute_force():
    rng = np.random.default_rng(0)
    hashes = [int(v) for v in rng.integers(0, 2**64 - 1, 300, dtype=np.uint64, endpoint=True)]
    hashes += [h ^ (1 << 63) ^ 0b101 for h in hashes[:20]]  # 3 bits off, the top bit among them
    found = set(hamming_pairs(hashes, 6, block=64))  # several blocks
    expected = {(i, j, bin(hashes[i] ^ hashes[j]).count("1")) for i in range(len(hashes))
                for j in range(i + 1, len(hashes)) if bin(hashes[i] ^ hashes[j]).count("1") <= 6}
    assert found == expected and len(expected) >= 20


def test_the_planted_cases_are_found_and_nothing_else(data):
    root, planted = data
    result = inspect_data(InspectConfig(str(root)))
    report = result.report
    pairs = {(Path(p["a"]["path"]).name, Path(p["b"]["path"]).name): p for p in report["pairs"]}
    assert len(pairs) == 3, list(pairs)
    copy = pairs[("0.png", "copy.png")]
    assert (copy["kind"], copy["across_splits"], copy["label_conflict"]) == ("exact", True, False)
    reencoded = pairs[("4.png", "reencoded.jpg")]
    assert (reencoded["kind"], reencoded["across_splits"], reencoded["label_conflict"]) == ("near", True, False)
    assert 0 <= reencoded["distance"] <= 6
    conflict = pairs[("1.png", "conflict.png")]
    assert (conflict["kind"], conflict["across_splits"], conflict["label_conflict"]) == ("exact", False, True)
    assert (conflict["a"]["label"], conflict["b"]["label"]) == ("cat", "dog")
    assert (result.leaks, result.label_conflicts) == (2, 1)
    assert report["duplicates"] == {"exact_pairs": 2, "near_pairs": 1, "similar_pairs": 0, "within_split": 1,
                                    "across_splits": 2, "label_conflicts": 1}
    assert report["backbone"] is report["similarity"] is None and {p["similarity"] for p in pairs.values()} == {None}

    train, valid = report["splits"]["train"], report["splits"]["valid"]
    with pytest.raises(ImageError) as reason:  # what predict says of the file
        load_image(planted["broken"])
    assert train["unreadable"] == [{"path": str(planted["broken"]), "error": str(reason.value)}]
    assert train["classes"] == {"cat": 5, "dog": 6} and train["imbalance"] == 1.2
    assert valid["classes"] == {"cat": 3, "dog": 2} and valid["modes"] == {"RGB": 4, "L": 1}
    assert train["tiny"] == [str(planted["tiny"])] and train["extreme_aspect"] == [str(planted["long"])]
    assert train["width"] == {"min": 20, "median": 64, "max": 200}


@pytest.fixture(scope="module")
def reframed(tmp_path_factory) -> Path:
    """train/ and valid/ of cats and dogs, with valid/cat/reframed.png: train/cat/30.png in a new
    5-px frame, which moves its pHash but which the checkpoint's preprocessing crops away (resize
    to 72 px, centre crop 64: its features are the original's); and that tiny checkpoint (a seeded
    random resnet18)."""
    import torch

    from cnnkit.config import PreprocessConfig
    from cnnkit.models.build import build_model
    from cnnkit.models.checkpoint import Checkpoint

    root = tmp_path_factory.mktemp("reframed")
    for split, label, seeds in (("train", "cat", range(30, 36)), ("train", "dog", range(40, 46)),
                                ("valid", "cat", range(50, 53)), ("valid", "dog", range(53, 56))):
        (root / "data" / split / label).mkdir(parents=True)
        for seed in seeds:
            picture(seed, (96, 96)).save(root / "data" / split / label / f"{seed}.png")
    with Image.open(root / "data" / "train" / "cat" / "30.png") as source:
        framed = source.copy()
    ImageDraw.Draw(framed).rectangle((0, 0, 95, 95), outline=(255, 255, 255), width=5)
    framed.save(root / "data" / "valid" / "cat" / "reframed.png")
    torch.manual_seed(0)
    model, head = build_model("resnet18", 2, "none", hidden_units=0)
    Checkpoint("resnet18", head, model.state_dict(), ["cat", "dog"], PreprocessConfig(64, 72)).save(root / "tiny.pt")
    return root


def test_a_copy_the_hashes_miss_is_a_similar_leak_with_a_backbone(reframed, tmp_path):
    data, checkpoint = reframed / "data", reframed / "tiny.pt"
    plain = inspect_data(InspectConfig(str(data), phash_distance=2)).report
    assert plain["pairs"] == []  # the frame moved the pHash more than 2 bits
    cfg = InspectConfig(str(data), phash_distance=2, checkpoint=str(checkpoint), cache_dir=str(tmp_path / "cache"),
                        device="cpu", workers=0, progress=False)
    result = inspect_data(cfg)
    report = result.report
    assert report["backbone"] == f"resnet18 (checkpoint {checkpoint})" and report["similarity"] == 0.9
    pairs = [(Path(p["a"]["path"]).name, Path(p["b"]["path"]).name, p["kind"], p["across_splits"])
             for p in report["pairs"]]
    assert pairs == [("30.png", "reframed.png", "similar", True)]
    assert report["pairs"][0]["similarity"] > 0.99 and report["pairs"][0]["distance"] > 2
    assert result.leaks == 1 and report["duplicates"]["similar_pairs"] == 1
    cached = list((tmp_path / "cache").glob("inspect-*.npy"))
    assert len(cached) == 1
    assert inspect_data(cfg).report == report and list((tmp_path / "cache").glob("inspect-*.npy")) == cached

    done = invoke(["inspect", data, "--phash-distance", "0", "--checkpoint", checkpoint, "--similarity", "1",
                   "--no-progress", "--workers", "0", "--cache-dir", tmp_path / "cache"])
    assert done.exit_code == 10, done.output
    assert "1 similar (features of resnet18" in done.stdout and "similar (cosine 1.000)" in done.stdout


def test_cli_exits_10_on_a_leak_and_writes_the_report(data, tmp_path, cli_env):
    root, planted = data
    out = tmp_path / "report"
    done = run_cli(["inspect", root, "--output", out], cli_env)
    assert done.returncode == 10, done.stderr
    assert_one_line_error(done.stderr, "2 duplicate pairs across splits (leaks) and 1 under two labels")
    assert "[leak]" in done.stdout and "[label conflict]" in done.stdout and str(planted["broken"]) in done.stdout
    report = json.loads((out / "inspect.json").read_text(encoding="utf-8"))
    with open(out / "pairs.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(report["pairs"]) == 3
    assert {(Path(r["path_a"]).name, Path(r["path_b"]).name, r["across_splits"], r["label_conflict"]) for r in rows} == {
        ("0.png", "copy.png", "True", "False"), ("4.png", "reencoded.jpg", "True", "False"),
        ("1.png", "conflict.png", "False", "True")}
    from PIL import Image

    with Image.open(out / "sizes.png") as sizes, Image.open(out / "pairs.png") as sheet:
        assert sizes.format == sheet.format == "PNG"
        assert sheet.height > 2.5 * sheet.width / 2  # a row for each of the 3 pairs
    assert "image sizes per split" in (out / "inspect.html").read_text(encoding="utf-8")
    again = invoke(["inspect", root, "--output", out])
    assert again.exit_code == 6
    assert_one_line_error(again.stderr, "inspect.json, pairs.csv", "--force")
    assert invoke(["inspect", root, "--output", out, "--force"]).exit_code == 10


def test_a_clean_folder_of_class_folders_exits_0_and_json_is_clean(tmp_path):
    for seed, label in enumerate(["a", "a", "b", "b", "b"]):
        (tmp_path / label).mkdir(exist_ok=True)
        picture(100 + seed).save(tmp_path / label / f"{seed}.png")
    done = invoke(["inspect", tmp_path, "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert list(report["splits"]) == ["all"] and report["splits"]["all"]["classes"] == {"a": 2, "b": 3}
    assert report["splits"]["all"]["imbalance"] == 1.5 and report["pairs"] == []


@pytest.mark.parametrize("args, code, fragment", [
    (["MISSING"], 3, "DATA_DIR not found"),
    (["EMPTY"], 3, "has no class folders"),
    (["DATA", "--phash-distance", "40"], 2, "--phash-distance must be 0 to 32"),
    (["DATA", "--similarity", "0.8"], 2, "--similarity and --cache-dir are for a backbone's features: add --checkpoint"),
    (["DATA", "--cache-dir", "x"], 2, "--similarity and --cache-dir are for a backbone's features"),
    (["DATA", "--arch", "resnet18", "--weights", "none", "--similarity", "1.5"], 2,
     "--similarity must be above 0 and at most 1 (a cosine), got 1.5"),
    (["DATA", "--image-size", "64"], 2, "--image-size is the crop of --arch's backbone: add --arch and --weights"),
], ids=["missing", "no-class-folders", "distance", "similarity-alone", "cache-alone", "similarity-range",
        "image-size-alone"])
def test_bad_usage_is_one_line_and_its_exit_code(args, code, fragment, data, tmp_path):
    (tmp_path / "empty").mkdir()
    values = {"MISSING": tmp_path / "nope", "EMPTY": tmp_path / "empty", "DATA": data[0]}
    done = invoke(["inspect", *(values.get(a, a) for a in args)])
    assert done.exit_code == code, done.output
    assert_one_line_error(done.stderr, fragment)


def test_without_imagehash_inspect_is_one_line_naming_the_extra(data, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name.split(".")[0] == "imagehash" else real(name, *args))
    done = invoke(["inspect", data[0]])
    assert done.exit_code == 2
    assert_one_line_error(done.stderr, "imagehash is not installed", "pip install 'cnnkit[inspect]'")
