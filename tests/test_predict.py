"""cnnkit.predict: scoring with a checkpoint's own preprocessing, error rows, output formats."""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil

import numpy as np
import pytest
import torch

from cnnkit.config import PredictConfig
from cnnkit.data.folders import expand_inputs
from cnnkit.data.transforms import build_transforms, load_image, resolve_preprocess
from cnnkit.errors import ConfigError, DataError
from cnnkit.inference.outputs import write_predictions
from cnnkit.inference.predict import predict
from cnnkit.inference.predictor import Guess, Prediction, Predictor
from cnnkit.models.checkpoint import load_checkpoint

from helpers import CLASSES, NAMES, read_metrics, write_corrupt_files


@pytest.fixture(scope="module")
def predictor(trained) -> Predictor:
    return Predictor(str(trained.best), device="cpu")


@pytest.fixture
def valid_paths(image_folder) -> list[str]:
    return list(expand_inputs([str(image_folder / "valid")]))


def _probabilities(guesses: list[Guess]) -> dict[str, float]:
    return {g.label: g.probability for g in guesses}


# --- THE preprocessing-identity test ----------------------------------------------------------


def test_inference_preprocessing_is_identical_to_training(trained, sample_images):
    """The eval pipeline training used and the one Predictor rebuilds from the checkpoint alone
    turn the same image into the same tensor, bit for bit."""
    at_training = trained.preprocess[False]  # the PreprocessConfig train() built its pipelines from
    assert trained.preprocess[True] == at_training  # augmenting pipeline: the same config
    assert at_training == resolve_preprocess(trained.cfg.arch, trained.cfg.image_size, trained.cfg.resize_size)
    assert (at_training.image_size, at_training.resize_size) == (32, 36)  # not the 224/256 defaults
    assert load_checkpoint(trained.best).preprocess == at_training
    assert load_checkpoint(trained.last).preprocess == at_training

    from_checkpoint = Predictor(str(trained.best), device="cpu")
    for path in sample_images:
        image = load_image(path)
        expected = build_transforms(at_training, train=False)(image)
        assert expected.shape == (3, 32, 32)
        assert torch.equal(from_checkpoint.transform(load_image(path)), expected)
        assert torch.equal(trained.transforms[False](image), expected)  # the validation pipeline itself


def test_predictor_reproduces_the_validation_accuracy_of_best(predictor, trained, valid_paths):
    rows = read_metrics(trained.metrics)
    best_row = next(r for r in rows if r["epoch"] == trained.result.best_epoch)
    predictions = list(predictor.predict_paths(valid_paths, top_k=1, batch_size=4))
    correct = sum(p.top[0].label == p.path.split("/")[-2] for p in predictions)
    assert correct / len(predictions) == pytest.approx(best_row["val_acc"], abs=1e-6)


# --- Predictor ------------------------------------------------------------------------------


def test_folder_predictions_keep_the_sorted_input_order(predictor, valid_paths):
    assert valid_paths == sorted(valid_paths) and len(valid_paths) == 6
    predictions = list(predictor.predict_paths(valid_paths, top_k=2, batch_size=4))
    assert [p.path for p in predictions] == valid_paths
    for prediction in predictions:
        assert prediction.ok and len(prediction.top) == 2
        first, second = prediction.top
        assert first.probability >= second.probability and first.label != second.label
        assert {first.label, second.label} <= set(CLASSES)
        assert first.name == NAMES[first.label]


def test_probabilities_over_all_classes_sum_to_one(predictor, sample_images):
    batch = torch.stack([predictor.transform(load_image(p)) for p in sample_images])
    probs = predictor.probabilities(batch)
    assert probs.shape == (3, 3)
    assert (probs >= 0).all()
    assert np.allclose(probs.sum(axis=1), np.ones(3), atol=1e-5)


def test_top_k_is_capped_at_the_number_of_classes_with_a_warning(predictor, sample_images, caplog):
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        (prediction,) = predictor.predict_paths([str(sample_images[0])], top_k=10)
    assert len(prediction.top) == 3
    assert {g.label for g in prediction.top} == set(CLASSES)
    assert sum(g.probability for g in prediction.top) == pytest.approx(1.0, abs=1e-5)
    assert "--top-k 10 is more than the 3 classes" in caplog.text


def test_bad_files_get_error_rows_while_the_others_are_scored(predictor, sample_images, tmp_path):
    bad = write_corrupt_files(tmp_path)
    good = [str(p) for p in sample_images]
    # batches of 2: [good, bad], [good, bad], [bad, good], [bad] (a batch with no image at all)
    paths = [good[0], str(bad["garbage"]), good[1], str(bad["text"]), str(tmp_path / "missing.jpg"), good[2], str(bad["truncated"])]
    predictions = list(predictor.predict_paths(paths, top_k=1, batch_size=2))
    assert [p.path for p in predictions] == paths
    assert [p.ok for p in predictions] == [True, False, True, False, False, True, False]
    assert "not an image" in predictions[1].error and "not an image" in predictions[3].error
    assert "not found" in predictions[4].error and "truncated" in predictions[6].error
    assert all(p.top == [] for p in predictions if not p.ok)
    one_by_one = {p: next(iter(predictor.predict_paths([p], top_k=1))) for p in good}
    for prediction in predictions:
        if prediction.ok:
            assert prediction.top[0].label == one_by_one[prediction.path].top[0].label


def test_predict_images_equals_predict_paths(predictor, valid_paths):
    from_images = predictor.predict_images([load_image(p) for p in valid_paths], top_k=3)
    from_paths = [p.top for p in predictor.predict_paths(valid_paths, top_k=3, batch_size=4)]
    assert len(from_images) == len(from_paths) == len(valid_paths)
    for a, b in zip(from_images, from_paths):
        assert [g.label for g in a] == [g.label for g in b]
        assert [g.name for g in a] == [g.name for g in b]
        assert [g.probability for g in a] == pytest.approx([g.probability for g in b], abs=1e-5)


def test_predict_images_of_nothing_is_nothing(predictor):
    assert predictor.predict_images([]) == []


def test_batched_results_equal_one_at_a_time(predictor, valid_paths):
    batched = list(predictor.predict_paths(valid_paths, top_k=3, batch_size=len(valid_paths)))
    single = [next(iter(predictor.predict_paths([p], top_k=3, batch_size=1))) for p in valid_paths]
    for a, b in zip(batched, single):
        pa, pb = _probabilities(a.top), _probabilities(b.top)
        assert pa.keys() == pb.keys()
        assert torch.allclose(torch.tensor([pa[c] for c in CLASSES]), torch.tensor([pb[c] for c in CLASSES]), atol=1e-5)


def test_worker_processes_give_the_same_results_in_the_same_order(predictor, valid_paths):
    in_process = list(predictor.predict_paths(valid_paths, top_k=3, batch_size=2, workers=0))
    with_workers = list(predictor.predict_paths(valid_paths, top_k=3, batch_size=2, workers=2))
    assert [p.path for p in with_workers] == valid_paths
    for a, b in zip(in_process, with_workers):
        assert [g.label for g in a.top] == [g.label for g in b.top]
        assert [g.probability for g in a.top] == pytest.approx([g.probability for g in b.top], abs=1e-6)


def test_category_names_file_overrides_the_checkpoint_names(trained, tmp_path, sample_images):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"blue": "azure", "green": "emerald", "red": "crimson"}))
    predictor = Predictor(str(trained.best), device="cpu", category_names=str(names))
    (prediction,) = predictor.predict_paths([str(sample_images[0])], top_k=3)
    assert {g.name for g in prediction.top} == {"azure", "emerald", "crimson"}


def test_without_names_the_label_is_the_name(trained, sample_images):
    ckpt = load_checkpoint(trained.best)
    ckpt.class_names = {}
    (prediction,) = Predictor(ckpt, device="cpu").predict_paths([str(sample_images[0])], top_k=3)
    assert all(g.name == g.label for g in prediction.top)
    text, _ = _write([prediction], "table", top_k=3)
    assert "(" not in text  # no "(label)" after a name that is the label


def test_category_names_missing_a_class_are_refused(trained, tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"blue": "azure"}))
    with pytest.raises(DataError, match="green, red"):
        Predictor(str(trained.best), device="cpu", category_names=str(names))


def test_predict_streams_rows_for_every_input_with_top_k_capped(trained, image_folder):
    cfg = PredictConfig(inputs=(str(image_folder / "valid"),), checkpoint=str(trained.best), top_k=7, workers=0, device="cpu", progress=False)
    stream = predict(cfg)
    assert stream.total == 6 and stream.top_k == 3
    rows = list(stream)
    assert len(rows) == 6 and all(r.ok and len(r.top) == 3 for r in rows)


# --- write_predictions ----------------------------------------------------------------------


@pytest.fixture
def mixed_rows(predictor, sample_images, tmp_path) -> list[Prediction]:
    """An error row first, then two scored rows with top-2 guesses."""
    missing = str(tmp_path / "gone, with a comma.jpg")
    return list(predictor.predict_paths([missing, str(sample_images[0]), str(sample_images[2])], top_k=2))


def _write(rows, fmt, top_k=2):
    out = io.StringIO()
    summary = write_predictions(iter(rows), fmt, out, top_k)
    return out.getvalue(), summary


def test_write_json_parses_back(mixed_rows):
    text, summary = _write(mixed_rows, "json")
    data = json.loads(text)
    assert (summary.scored, summary.failed) == (2, 1)
    assert [row["path"] for row in data] == [r.path for r in mixed_rows]
    assert "error" in data[0] and "predictions" not in data[0]
    for row, pred in zip(data[1:], mixed_rows[1:]):
        assert [g["label"] for g in row["predictions"]] == [g.label for g in pred.top]
        assert [g["name"] for g in row["predictions"]] == [g.name for g in pred.top]
        assert [g["probability"] for g in row["predictions"]] == pytest.approx([g.probability for g in pred.top], abs=1e-6)


def test_write_json_of_no_rows_is_an_empty_list():
    text, summary = _write([], "json")
    assert json.loads(text) == [] and (summary.scored, summary.failed) == (0, 0)


def test_write_jsonl_gives_one_object_per_line(mixed_rows):
    text, _ = _write(mixed_rows, "jsonl")
    lines = text.splitlines()
    assert len(lines) == 3
    rows = [json.loads(line) for line in lines]
    assert rows[0] == {"path": mixed_rows[0].path, "error": mixed_rows[0].error}
    assert rows[2]["predictions"][0]["label"] == mixed_rows[2].top[0].label


def test_write_csv_has_consistent_columns_even_when_the_first_row_is_an_error(mixed_rows):
    text, _ = _write(mixed_rows, "csv")
    table = list(csv.reader(io.StringIO(text)))
    header = table[0]
    assert header == ["path", "label", "name", "probability", "label_2", "name_2", "probability_2", "error"]
    assert all(len(row) == len(header) for row in table)
    records = list(csv.DictReader(io.StringIO(text)))
    assert records[0]["path"] == mixed_rows[0].path  # the comma in the name survives quoting
    assert records[0]["error"] == mixed_rows[0].error and records[0]["label"] == "" and records[0]["probability_2"] == ""
    for record, pred in zip(records[1:], mixed_rows[1:]):
        assert record["error"] == ""
        assert (record["label"], record["name"]) == (pred.top[0].label, pred.top[0].name)
        assert float(record["probability"]) == pytest.approx(pred.top[0].probability, abs=1e-6)
        assert record["label_2"] == pred.top[1].label


def test_write_table_is_readable(mixed_rows):
    text, _ = _write(mixed_rows, "table")
    assert f"{mixed_rows[0].path}\n    error: {mixed_rows[0].error}" in text
    for pred in mixed_rows[1:]:
        assert pred.path in text and pred.top[0].name in text and f"({pred.top[0].label})" in text
    assert "%" in text


def test_write_unknown_format_is_a_config_error(mixed_rows):
    with pytest.raises(ConfigError, match="--format"):
        _write(mixed_rows, "xml")


def test_predictor_accepts_a_loaded_checkpoint(trained, sample_images, predictor):
    from_object = Predictor(load_checkpoint(trained.best), device="cpu")
    (a,) = from_object.predict_paths([str(sample_images[1])], top_k=3)
    (b,) = predictor.predict_paths([str(sample_images[1])], top_k=3)
    assert _probabilities(a.top) == pytest.approx(_probabilities(b.top), abs=1e-6)


def test_predictions_do_not_depend_on_the_checkpoint_location(trained, tmp_path, sample_images, predictor):
    moved = tmp_path / "elsewhere.pt"
    shutil.copy(trained.best, moved)
    (a,) = Predictor(str(moved), device="cpu").predict_paths([str(sample_images[2])], top_k=3)
    (b,) = predictor.predict_paths([str(sample_images[2])], top_k=3)
    assert _probabilities(a.top) == pytest.approx(_probabilities(b.top), abs=1e-6)
