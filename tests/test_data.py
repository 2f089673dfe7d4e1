"""cnnkit.data: training splits, inference inputs, category names, the dataset and collate."""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnkit.config import PreprocessConfig
from cnnkit.data.folders import (
    ImageDataset,
    collate,
    expand_inputs,
    load_category_names,
    load_splits,
    scan_image_folder,
    stratified_split,
)
from cnnkit.data.transforms import build_transforms
from cnnkit.errors import DataError

from helpers import CLASSES, N_FLAT, N_TRAIN, N_VALID, colour_image, write_class_images

# --- load_splits: train/ + valid/ -----------------------------------------------------------


def test_train_and_valid_folders_give_fixed_splits(image_folder):
    splits = load_splits(str(image_folder))
    assert splits.classes == list(CLASSES)
    assert len(splits.train) == 3 * N_TRAIN and len(splits.valid) == 3 * N_VALID
    assert all("/train/" in p for p, _ in splits.train) and all("/valid/" in p for p, _ in splits.valid)
    assert splits.class_to_idx == {"blue": 0, "green": 1, "red": 2}
    for path, label in splits.train + splits.valid:
        assert Path(path).parent.name == CLASSES[label]
    assert "validation set" in splits.description


def test_val_folder_is_accepted_as_the_validation_set(image_folder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(image_folder / "train", root / "train")
    shutil.copytree(image_folder / "valid", root / "val")
    splits = load_splits(str(root))
    assert len(splits.valid) == 3 * N_VALID
    assert all("/val/" in p for p, _ in splits.valid)


def test_test_folder_is_left_alone(image_folder, tmp_path):
    root = Path(shutil.copytree(image_folder, tmp_path / "data"))
    shutil.copytree(image_folder / "valid", root / "test")
    splits = load_splits(str(root))
    assert not any("/test/" in p for p, _ in splits.train + splits.valid)


def test_validation_classes_differing_from_train_name_the_classes(image_folder_copy):
    shutil.rmtree(image_folder_copy / "valid" / "green")
    write_class_images(image_folder_copy / "valid" / "purple", "red", 2, np.random.default_rng(0))
    with pytest.raises(DataError) as info:
        load_splits(str(image_folder_copy))
    message = str(info.value)
    assert "only in train: ['green']" in message
    assert "only in validation: ['purple']" in message


def test_empty_class_folder_is_a_data_error(image_folder_copy):
    (image_folder_copy / "train" / "yellow").mkdir()
    with pytest.raises(DataError, match="yellow has no images"):
        load_splits(str(image_folder_copy))


def test_folder_without_class_folders_is_a_data_error(tmp_path):
    (tmp_path / "loose.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_splits(str(tmp_path))


def test_missing_data_dir_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="DATA_DIR not found"):
        load_splits(str(tmp_path / "nowhere"))


def test_data_dir_that_is_a_file_is_a_data_error(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        load_splits(str(path))


def test_hidden_entries_and_non_images_are_ignored(image_folder_copy):
    train = image_folder_copy / "train"
    (train / ".cache").mkdir()
    colour_image("red", np.random.default_rng(0)).save(train / ".cache" / "x.png")
    colour_image("red", np.random.default_rng(0)).save(train / "red" / ".hidden.png")
    (train / "red" / "README.txt").write_text("not an image")
    splits = load_splits(str(image_folder_copy))
    assert splits.classes == list(CLASSES)
    assert len(splits.train) == 3 * N_TRAIN


def test_images_in_nested_class_subfolders_are_found(image_folder_copy):
    nested = image_folder_copy / "train" / "red" / "more"
    write_class_images(nested, "red", 2, np.random.default_rng(3))
    splits = load_splits(str(image_folder_copy))
    assert Counter(label for _, label in splits.train)[CLASSES.index("red")] == N_TRAIN + 2


# --- load_splits: a flat ImageFolder ---------------------------------------------------------


def test_flat_folder_is_split_stratified_with_every_class_in_validation(flat_folder):
    splits = load_splits(str(flat_folder), val_split=0.25, seed=0)
    valid_counts = Counter(label for _, label in splits.valid)
    train_counts = Counter(label for _, label in splits.train)
    assert valid_counts == {0: 2, 1: 2, 2: 2}  # 25% of 8 per class
    assert train_counts == {0: 6, 1: 6, 2: 6}
    assert not set(splits.train) & set(splits.valid)
    assert sorted(splits.train + splits.valid) == sorted(scan_image_folder(str(flat_folder))[1])
    assert "25% of" in splits.description and "seed 0" in splits.description


def test_flat_split_is_the_same_for_the_same_seed_and_differs_for_another(flat_folder):
    a = load_splits(str(flat_folder), val_split=0.25, seed=7)
    b = load_splits(str(flat_folder), val_split=0.25, seed=7)
    c = load_splits(str(flat_folder), val_split=0.25, seed=8)
    assert a.valid == b.valid and a.train == b.train
    assert a.valid != c.valid


@pytest.mark.parametrize("val_split, expected", [(0.1, 1), (0.2, 2), (0.5, 4), (0.95, N_FLAT - 1)])
def test_flat_split_proportions_keep_at_least_one_image_on_each_side(flat_folder, val_split, expected):
    splits = load_splits(str(flat_folder), val_split=val_split)
    counts = Counter(label for _, label in splits.valid)
    assert set(counts.values()) == {expected}


def test_train_folder_without_valid_is_split(image_folder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(image_folder / "train", root / "train")
    splits = load_splits(str(root), val_split=0.5)
    assert len(splits.valid) == 3 * (N_TRAIN // 2)
    assert all("/train/" in p for p, _ in splits.valid)


def test_stratified_split_refuses_when_no_class_can_spare_an_image():
    samples = [("a.jpg", 0), ("b.jpg", 1)]
    with pytest.raises(DataError, match="at least 2 images"):
        stratified_split(samples, 0.2, 0)


def test_stratified_split_keeps_single_image_classes_in_train():
    samples = [("a1.jpg", 0), ("a2.jpg", 0), ("a3.jpg", 0), ("b.jpg", 1)]
    train, valid = stratified_split(samples, 0.34, 0)
    assert ("b.jpg", 1) in train and len(valid) == 1 and valid[0][1] == 0


# --- expand_inputs --------------------------------------------------------------------------


def test_expand_inputs_passes_files_through_in_order(tmp_path):
    inputs = [str(tmp_path / "b.jpg"), str(tmp_path / "a.png")]
    assert list(expand_inputs(inputs)) == inputs


def test_expand_inputs_recurses_folders_sorted_keeping_only_images(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "z").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for rel in ["z/2.jpg", "z/1.PNG", "a/deep/x.jpg", "top.png"]:
        colour_image("red", rng).save(tmp_path / rel, format="PNG")
    (tmp_path / "notes.txt").write_text("skip me")
    (tmp_path / "z" / "model.pt").write_bytes(b"PK")
    (tmp_path / ".hidden.jpg").write_bytes(b"")
    found = list(expand_inputs([str(tmp_path)]))
    relative = [str(Path(p).relative_to(tmp_path)) for p in found]
    assert relative == ["a/deep/x.jpg", "top.png", "z/1.PNG", "z/2.jpg"]


def test_expand_inputs_keeps_named_missing_and_non_image_files_for_error_rows(tmp_path):
    inputs = [str(tmp_path / "missing.jpg"), str(tmp_path / "notes.txt")]
    assert list(expand_inputs(inputs)) == inputs


def test_expand_inputs_reads_paths_from_stdin_for_dash(tmp_path):
    stdin = io.StringIO("one.jpg\r\n\n  \ntwo words.png\nthree.jpg")
    result = list(expand_inputs(["first.jpg", "-", "last.jpg"], stdin=stdin))
    assert result == ["first.jpg", "one.jpg", "two words.png", "three.jpg", "last.jpg"]


def test_expand_inputs_warns_about_an_empty_folder(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        assert list(expand_inputs([str(tmp_path / "empty")])) == []
    assert "no images in folder" in caplog.text


# --- load_category_names --------------------------------------------------------------------


def _names_file(tmp_path, content: str) -> str:
    path = tmp_path / "names.json"
    path.write_text(content, encoding="utf-8")
    return str(path)


def test_category_names_are_checked_and_limited_to_the_classes(tmp_path):
    path = _names_file(tmp_path, json.dumps({"red": "Red", "green": "Green", "blue": "Blue", "extra": "X"}))
    assert load_category_names(path, list(CLASSES)) == {"blue": "Blue", "green": "Green", "red": "Red"}
    assert load_category_names(path)["extra"] == "X"


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"red": "Red",', "not valid JSON"),
        ("", "not valid JSON"),
        ('["red", "green"]', "must be a JSON object"),
        ('{"red": 1, "green": "Green", "blue": "Blue"}', "must be a JSON object"),
        ('{"red": "Red"}', "no name for classes: blue, green"),
    ],
)
def test_bad_category_names_are_data_errors(tmp_path, content, fragment):
    with pytest.raises(DataError, match=fragment):
        load_category_names(_names_file(tmp_path, content), list(CLASSES))


def test_missing_category_names_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_category_names(str(tmp_path / "nope.json"), list(CLASSES))


def test_category_names_that_are_not_utf8_are_a_data_error(tmp_path):
    path = tmp_path / "names.json"
    path.write_bytes(b'{"red": "\xff\xfe"}')
    with pytest.raises(DataError, match="cannot read"):
        load_category_names(str(path))


# --- ImageDataset and collate ---------------------------------------------------------------


def test_dataset_returns_a_reason_instead_of_raising_for_a_bad_file(tmp_path, sample_images):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    transform = build_transforms(PreprocessConfig(image_size=32, resize_size=36), train=False)
    dataset = ImageDataset([str(sample_images[0]), str(bad)], transform, targets=[2, 1])
    tensor, target, error = dataset[0]
    assert tensor.shape == (3, 32, 32) and target == 2 and error is None
    tensor, target, error = dataset[1]
    assert tensor is None and target == 1 and error[0] == str(bad) and "not an image" in error[1]


def test_dataset_targets_default_to_indices_and_respect_max_pixels(sample_images):
    transform = build_transforms(PreprocessConfig(image_size=32, resize_size=36), train=False)
    dataset = ImageDataset([str(p) for p in sample_images], transform, max_pixels=100)
    assert len(dataset) == 3
    _, target, error = dataset[2]
    assert target == 2 and "too large" in error[1]


def test_collate_stacks_good_images_and_keeps_every_target_and_error_in_order():
    good = torch.zeros(3, 4, 4)
    batch = [(good, 0, None), (None, 1, ("bad.jpg", "corrupt")), (good + 1, 2, None)]
    images, targets, errors = collate(batch)
    assert images.shape == (2, 3, 4, 4) and images[1].mean() == 1
    assert targets.tolist() == [0, 1, 2]
    assert errors == [None, ("bad.jpg", "corrupt"), None]


def test_collate_of_only_bad_images_has_no_tensor():
    images, targets, errors = collate([(None, 0, ("a", "x")), (None, 1, ("b", "y"))])
    assert images is None and targets.tolist() == [0, 1] and all(errors)
