"""Hostile inputs to the command line, as a user runs it: awkward file names (spaces, unicode,
newlines, bytes that are not UTF-8), named pipes, symlink loops, unreadable files, folders of
nothing but bad images, and category-names files of the wrong shape.

Every failure is one line on stderr starting ``cnnkit: error:`` with the documented exit code
(cnnkit/errors.py) and no traceback; nothing hangs (each run has a hard timeout).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest
from click.testing import CliRunner

from cnnkit.cli import main

from deploy_helpers import CLASSES as CKPT_CLASSES
from deploy_helpers import image_bytes, make_checkpoint
from helpers import (
    CLASSES,
    TINY_TRAIN_ARGS,
    as_ordinary_user,
    assert_one_line_error,
    cnnkit_command,
    make_flat_folder,
    write_corrupt_files,
)

POSIX = pytest.mark.skipif(not hasattr(os, "mkfifo") or sys.platform == "win32", reason="POSIX file names and special files")
TIMEOUT = 180  # a hang is a failure, not a stuck suite


def run_bytes(args: list, env: dict[str, str], stdin: bytes | None = None, timeout: float = TIMEOUT,
              prefix: Sequence[str] = ()):
    """``python -m cnnkit ARGS`` (after ``prefix``, a launcher) with raw bytes in and out (paths
    need not be UTF-8)."""
    return subprocess.run([*prefix, *cnnkit_command(*map(os.fsencode, args))], input=stdin,
                          capture_output=True, env=env, timeout=timeout)


def text(data: bytes) -> str:
    """Output bytes as Python sees file names: undecodable bytes as surrogate escapes."""
    return data.decode("utf-8", "surrogateescape")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("hostile-ckpt") / "model.pt", reference=False)


@pytest.fixture
def strict_env(cli_env) -> dict[str, str]:
    """A desktop's UTF-8 locale, where Python's stdout and stdin are strict (unlike C.UTF-8's)."""
    return {**cli_env, "PYTHONIOENCODING": "utf-8"}


GOOD_NAMES = [
    "with space.png",
    "  leading and trailing spaces  .png",
    "ünïcødé 写真 🌸.png",
    "new\nline.png",
    "tab\tand\rreturn.png",
    "-rf.png",
    "quotes \"'` and , comma.png",
]
NOT_UTF8 = b"latin1-caf\xe9.png"  # a name from an old archive: not valid UTF-8


def _hostile_folder(root: Path) -> tuple[list[str], dict[str, str]]:
    """Good images under awkward names, and bad entries: {path: expected error fragment}."""
    root.mkdir()
    good = []
    for i, name in enumerate(GOOD_NAMES):
        (root / name).write_bytes(image_bytes(i))
        good.append(str(root / name))
    raw = os.path.join(os.fsencode(root), NOT_UTF8)
    with open(raw, "wb") as handle:
        handle.write(image_bytes(99))
    good.append(os.fsdecode(raw))
    sub = root / "sub dir ✓"
    sub.mkdir()
    (sub / "nested.png").write_bytes(image_bytes(50))
    good.append(str(sub / "nested.png"))
    os.symlink("..", sub / "up")  # a directory loop: must not be followed forever
    os.symlink("loop-dir", root / "loop-dir")  # a self-referencing symlink
    bad = {}
    os.mkfifo(root / "pipe.png")
    bad[str(root / "pipe.png")] = "not an image"  # a FIFO without a writer: must not hang
    os.symlink("loop.jpg", root / "loop.jpg")
    bad[str(root / "loop.jpg")] = "symbolic links"
    os.symlink("nowhere.jpg", root / "dangling.jpg")
    bad[str(root / "dangling.jpg")] = "not found"
    return good, bad


def _rows_jsonl(stdout: bytes) -> list[dict]:
    return [json.loads(line) for line in text(stdout).split("\n") if line]


@POSIX
def test_predict_folder_of_hostile_names_scores_every_image_in_order(checkpoint, tmp_path, strict_env):
    good, bad = _hostile_folder(tmp_path / "photos")
    result = run_bytes(["predict", tmp_path / "photos", "-c", checkpoint, "--format", "jsonl", "--device", "cpu"], strict_env)
    stderr = text(result.stderr)
    assert result.returncode == 7, stderr
    assert_one_line_error(stderr, f"{len(bad)} of {len(good) + len(bad)} inputs could not be scored")
    rows = _rows_jsonl(result.stdout)
    by_path = {row["path"]: row for row in rows}
    assert len(rows) == len(by_path) == len(good) + len(bad)
    assert [row["path"] for row in rows] == sorted(by_path)  # folders are listed sorted
    for path in good:
        assert by_path[path]["predictions"][0]["label"] in CKPT_CLASSES, path
    for path, fragment in bad.items():
        assert fragment in by_path[path]["error"], (path, by_path[path])


@POSIX
def test_predict_to_a_csv_file_and_resume_with_hostile_names(checkpoint, tmp_path, cli_env):
    good, bad = _hostile_folder(tmp_path / "photos")
    out = tmp_path / "scores.csv"
    first = run_bytes(["predict", tmp_path / "photos", "-c", checkpoint, "-o", out, "--device", "cpu"], cli_env)
    assert first.returncode == 7, text(first.stderr)
    assert_one_line_error(text(first.stderr), "could not be scored")
    with open(out, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["path"] for row in rows} == {*good, *bad}
    assert all(bool(row["error"]) == (row["path"] in bad) for row in rows)
    before = out.read_bytes()
    again = run_bytes(["predict", tmp_path / "photos", "-c", checkpoint, "-o", out, "--resume", "--device", "cpu"], cli_env)
    assert again.returncode == 0, text(again.stderr)  # every path is already in the file
    assert "Traceback" not in text(again.stderr)
    assert out.read_bytes() == before


@POSIX
def test_predict_paths_on_stdin_with_hostile_names(checkpoint, tmp_path, strict_env):
    """Paths on stdin are one per line (LF or CRLF; blank lines skipped): spaces and unicode are
    kept as they are. A name containing a newline cannot be given this way: its two halves
    arrive as two paths, which are not found (error rows, exit 7), never a crash."""
    good, _ = _hostile_folder(tmp_path / "photos")
    listable = [p for p in good if "\n" not in p and "\r" not in p]
    newline_path = next(p for p in good if "\n" in p)
    lines = [os.fsencode(p) for p in listable]
    stdin = b"\r\n".join(lines[:2]) + b"\r\n\n   \n" + b"\n".join(lines[2:]) + b"\n" + os.fsencode(newline_path) + b"\n"
    result = run_bytes(["predict", "-", "-c", checkpoint, "--format", "jsonl", "--device", "cpu"], strict_env, stdin=stdin)
    stderr = text(result.stderr)
    assert result.returncode == 7, stderr
    assert_one_line_error(stderr, "2 of")
    rows = _rows_jsonl(result.stdout)
    halves = newline_path.split("\n")
    assert [row["path"] for row in rows] == [*listable, *halves]
    assert all("predictions" in row for row in rows[: len(listable)])
    assert all("not found" in row["error"] for row in rows[len(listable):])


@POSIX
def test_predict_unreadable_file_gets_an_error_row(checkpoint, tmp_path, cli_env):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ok.png").write_bytes(image_bytes(1))
    locked = folder / "locked.png"
    locked.write_bytes(image_bytes(2))
    locked.chmod(0)
    try:
        result = run_bytes(["predict", folder, "-c", checkpoint, "--format", "jsonl", "--device", "cpu"], cli_env,
                           prefix=as_ordinary_user(["cat", str(locked)]))
    finally:
        locked.chmod(0o644)
    assert result.returncode == 7, text(result.stderr)
    assert_one_line_error(text(result.stderr), "1 of 2 inputs could not be scored")
    rows = {row["path"]: row for row in _rows_jsonl(result.stdout)}
    assert rows[str(locked)]["error"] == "permission denied"
    assert "predictions" in rows[str(folder / "ok.png")]


# --- train -----------------------------------------------------------------------------------------


@POSIX
def test_train_on_a_folder_with_symlink_loops_trains(tmp_path, cli_env):
    data = make_flat_folder(tmp_path / "data", per_class=4, seed=0)
    for colour in CLASSES:
        os.symlink("..", data / colour / "back")  # a loop back to DATA_DIR: not followed
    os.symlink("self", data / "self")  # a self-loop beside the class folders
    os.symlink(".", data / "green" / "here")
    result = run_bytes(["train", data, *TINY_TRAIN_ARGS, "--epochs", "1", "--save-dir", tmp_path / "run"], cli_env)
    stderr = text(result.stderr)
    assert result.returncode == 0, stderr
    assert "Traceback" not in stderr
    from cnnkit.models.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "run" / "best.pt").classes == list(CLASSES)  # no loop became a class


@POSIX
def test_train_on_class_folders_of_only_bad_files_fails_with_one_line(tmp_path, cli_env):
    data = tmp_path / "data"
    for colour in CLASSES:
        write_corrupt_files(data / colour)
        os.mkfifo(data / colour / "pipe.jpg")
    result = run_bytes(["train", data, *TINY_TRAIN_ARGS, "--epochs", "1", "--save-dir", tmp_path / "run"], cli_env)
    stderr = text(result.stderr)
    assert result.returncode == 3, stderr
    line = assert_one_line_error(stderr, "cannot read image", str(data), "remove or fix the file")
    assert any(reason in line for reason in ("not an image", "truncated", "corrupt"))
    assert not (tmp_path / "run" / "best.pt").exists()


# --- category-names files of the wrong shape (CliRunner: no model is built before they fail) ------


NAMES_FILES = {
    "list-instead-of-object": (json.dumps(["Blue sky", "Green leaf", "Red rose"]).encode(), "must be a JSON object"),
    "numbers-as-names": (json.dumps({"blue": 1, "green": 2, "red": 3}).encode(), "must be a JSON object"),
    "nested-objects": (json.dumps({"blue": {"name": "Blue"}, "green": "G", "red": "R"}).encode(), "must be a JSON object"),
    "null-names": (json.dumps({"blue": None, "green": "G", "red": "R"}).encode(), "must be a JSON object"),
    "a-string": (json.dumps("blue").encode(), "must be a JSON object"),
    "invalid-json": (b"{'blue': 'Blue sky'}", "not valid JSON"),
    "truncated-json": (b'{"blue": "Blue sk', "not valid JSON"),
    "empty-file": (b"", "not valid JSON"),
    "not-utf8": ('{"blue": "Bl\u00e9"}'.encode("latin-1"), "can't decode byte 0xe9"),
    "utf16": (json.dumps({"blue": "B"}).encode("utf-16"), "can't decode byte 0xff"),
    "deeply-nested": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "binary-garbage": (bytes(range(256)) * 8, "can't decode byte 0x80"),
    "missing-classes": (json.dumps({"blue": "Blue sky"}).encode(), "no name for classes"),
}


@pytest.fixture(scope="module")
def names_data(tmp_path_factory) -> Path:
    return make_flat_folder(tmp_path_factory.mktemp("names-data"), per_class=3, seed=0)


@pytest.mark.parametrize("command", ["train", "predict"])
@pytest.mark.parametrize("kind", sorted(NAMES_FILES))
def test_bad_category_names_exit_3_with_one_line(kind, command, names_data, checkpoint, tmp_path, monkeypatch):
    content, fragment = NAMES_FILES[kind]
    if command == "predict" and kind == "missing-classes":
        content = json.dumps({"cat": "Cat"}).encode()
    names = tmp_path / "names.json"
    names.write_bytes(content)
    monkeypatch.chdir(tmp_path)
    if command == "train":
        args = ["train", names_data, *TINY_TRAIN_ARGS, "--epochs", "1", "--save-dir", tmp_path / "run", "--category-names", names]
    else:
        args = ["predict", names_data / "red", "-c", checkpoint, "--device", "cpu", "--category-names", names]
    result = CliRunner().invoke(main, [str(a) for a in args], prog_name="cnnkit")
    assert result.exit_code == 3, (result.exit_code, result.stderr, result.exception)
    line = assert_one_line_error(result.stderr, fragment, str(names))
    assert len(line) < 400  # one readable line, not a dump of the file
    assert result.stdout == ""
    assert not (tmp_path / "run").exists()


def test_category_names_with_a_utf8_bom_are_read(checkpoint, names_data, tmp_path):
    """Windows editors save JSON with a byte-order mark: that is still UTF-8 JSON."""
    names = tmp_path / "names.json"
    names.write_bytes(b"\xef\xbb\xbf" + json.dumps({"cat": "Chat", "dog": "Chien", "fox": "Renard"}, ensure_ascii=False).encode())
    args = ["predict", names_data / "red", "-c", checkpoint, "--device", "cpu", "--category-names", names, "-f", "jsonl", "-k", "3"]
    result = CliRunner().invoke(main, [str(a) for a in args], prog_name="cnnkit")
    assert result.exit_code == 0, (result.stderr, result.exception)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows and all({g["name"] for g in row["predictions"]} == {"Chat", "Chien", "Renard"} for row in rows)
