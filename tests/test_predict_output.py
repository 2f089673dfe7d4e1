"""cnnkit.predict for big jobs: --output written as rows arrive, --resume, --shard, --abstain."""

from __future__ import annotations

import csv
import io
import json

import pytest

from cnnkit.config import PredictConfig
from cnnkit.errors import ConfigError, OutputError
from cnnkit.inference.outputs import select_shard
from cnnkit.inference.predict import predict, predict_to_output
from cnnkit.models.checkpoint import load_checkpoint

from helpers import assert_one_line_error, run_cli


def _cfg(trained, inputs, **kw) -> PredictConfig:
    values = dict(inputs=tuple(map(str, inputs)), checkpoint=str(trained.best), workers=0, device="cpu",
                  progress=False, batch_size=4)
    values.update(kw)
    return PredictConfig(**values)


def _csv_paths(path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [row["path"] for row in csv.DictReader(handle)]


def test_output_file_holds_every_input_in_order(trained, image_folder, tmp_path):
    out = tmp_path / "scores.csv"
    summary = predict_to_output(_cfg(trained, [image_folder / "train"], output=str(out), top_k=2), io.StringIO())
    paths = _csv_paths(out)
    assert summary.scored == len(paths) == 18
    assert paths == sorted(paths)


def test_existing_output_needs_resume_or_force(trained, image_folder, tmp_path):
    out = tmp_path / "scores.jsonl"
    out.write_text("precious\n")
    with pytest.raises(OutputError, match="--resume"):
        predict_to_output(_cfg(trained, [image_folder / "valid"], output=str(out)), io.StringIO())
    assert out.read_text() == "precious\n"
    predict_to_output(_cfg(trained, [image_folder / "valid"], output=str(out), force=True), io.StringIO())
    assert len(out.read_text().splitlines()) == 6


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_resume_after_a_kill_scores_each_input_exactly_once(trained, image_folder, tmp_path, suffix):
    full = tmp_path / f"full.{suffix}"
    cut = tmp_path / f"cut.{suffix}"
    inputs = [image_folder / "train"]
    predict_to_output(_cfg(trained, inputs, output=str(full)), io.StringIO())
    data = full.read_bytes()
    lines = data.splitlines(keepends=True)
    # a run killed mid-row: 7 complete lines and half of the next
    cut.write_bytes(b"".join(lines[:7]) + lines[7][: len(lines[7]) // 2])
    summary = predict_to_output(_cfg(trained, inputs, output=str(cut), resume=True), io.StringIO())
    header = 1 if suffix == "csv" else 0
    assert summary.scored == 18 - (7 - header)
    assert cut.read_bytes() == data  # same rows, same order, nothing twice


def test_resume_refuses_an_output_with_other_columns(trained, image_folder, tmp_path):
    out = tmp_path / "scores.csv"
    predict_to_output(_cfg(trained, [image_folder / "valid"], output=str(out), top_k=1), io.StringIO())
    with pytest.raises(ConfigError, match="--top-k"):
        predict_to_output(_cfg(trained, [image_folder / "valid"], output=str(out), top_k=2, resume=True),
                          io.StringIO())


def test_shards_partition_the_inputs_stably():
    paths = [f"photos/{i:05d}.jpg" for i in range(1000)]
    shards = [select_shard(paths, k, 4) for k in range(4)]
    assert sorted(sum(shards, [])) == paths  # every path in exactly one shard
    assert all(150 < len(s) < 350 for s in shards)  # roughly even
    # adding files, or listing in another order, moves no existing path to another shard
    more = paths[::-1] + [f"photos/new_{i}.jpg" for i in range(50)]
    assert set(select_shard(more, 2, 4)) >= set(shards[2])


def test_concatenated_shards_equal_one_full_run(trained, image_folder, tmp_path):
    full = [r.to_dict() for r in predict(_cfg(trained, [image_folder / "train"], top_k=2))]
    parts = []
    for k in range(3):
        parts += [r.to_dict() for r in predict(_cfg(trained, [image_folder / "train"], top_k=2, shard=f"{k}/3"))]
    key = lambda row: row["path"]  # noqa: E731
    parts, full = sorted(parts, key=key), sorted(full, key=key)
    assert [(r["path"], [p["label"] for p in r["predictions"]]) for r in parts] == \
        [(r["path"], [p["label"] for p in r["predictions"]]) for r in full]
    # A shard batches other images together, and a CPU convolution's last bits depend on the
    # batch: a probability may round to the next 1e-6
    for a, b in zip(parts, full):
        assert [p["probability"] for p in a["predictions"]] == \
            pytest.approx([p["probability"] for p in b["predictions"]], abs=2e-6)


def test_abstain_labels_low_confidence_images_unknown(trained, image_folder, tmp_path):
    ckpt = load_checkpoint(trained.best)
    ckpt.calibration = {"abstain_threshold": 0.999999}  # nearly everything falls below it
    path = tmp_path / "strict.pt"
    ckpt.save(path)
    rows = list(predict(_cfg(trained, [image_folder / "valid"], checkpoint=str(path), abstain=True)))
    assert rows and all(r.abstained for r in rows if r.top[0].probability < 0.999999)
    out = io.StringIO()
    stream = predict(_cfg(trained, [image_folder / "valid"], checkpoint=str(path), abstain=True))
    from cnnkit.inference.outputs import write_predictions

    write_predictions(stream, "jsonl", out, stream.top_k, stream.abstain)
    first = json.loads(out.getvalue().splitlines()[0])
    assert first["predicted"] == "unknown" and first["predictions"][0]["label"]
    with pytest.raises(ConfigError, match="target-coverage"):  # no threshold stored
        predict(_cfg(trained, [image_folder / "valid"], abstain=True))


def test_cli_output_resume_and_bad_flags(trained, image_folder, cli_env, tmp_path):
    out = tmp_path / "scores.csv"
    args = ["predict", str(image_folder / "valid"), "-c", str(trained.best), "--workers", "0", "-o", str(out)]
    first = run_cli(args, cli_env)
    assert first.returncode == 0, first.stderr
    assert first.stdout == ""  # rows went to the file
    assert len(_csv_paths(out)) == 6
    again = run_cli(args, cli_env)
    assert again.returncode == 6
    assert_one_line_error(again.stderr, "--resume", "--force")
    resumed = run_cli(args + ["--resume"], cli_env)
    assert resumed.returncode == 0 and len(_csv_paths(out)) == 6
    bad = run_cli(["predict", str(image_folder), "-c", str(trained.best), "--shard", "3/3"], cli_env)
    assert bad.returncode == 2
    assert_one_line_error(bad.stderr, "--shard")
    json_resume = run_cli(["predict", str(image_folder), "-c", str(trained.best), "-o",
                           str(tmp_path / "x.json"), "--resume"], cli_env)
    assert json_resume.returncode == 2
    assert_one_line_error(json_resume.stderr, "JSON")
