"""The README's two fresh-machine commands stay in step with CI and with the files they use."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    """name -> version of every requirement line of a compiled lock (all of them must be ==)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line.strip())
        assert match, f"{path.name}: not an exact pin: {line!r}"
        pins[_normalize(match[1])] = match[2]
    return pins


def _declared() -> dict[str, set[str]]:
    """pyproject.toml's requirement names: "dependencies" and each extra."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    deps = re.search(r"^dependencies = \[(.*?)\]", text, flags=re.S | re.M)
    assert deps
    groups = {"dependencies": deps[1]}
    extras = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[)", text, flags=re.S | re.M)
    assert extras
    for name, body in re.findall(r"^([A-Za-z0-9_-]+) = \[(.*?)\]", extras[1], flags=re.S | re.M):
        groups[name] = body
    return {
        group: {_normalize(re.match(r"[A-Za-z0-9._-]+", req)[0]) for req in re.findall(r'"([^"]+)"', body)}
        for group, body in groups.items()
    }


def test_ci_runs_exactly_the_readme_test_command_in_a_fresh_venv():
    test_command = _bash_blocks()[1]
    assert test_command.startswith("pip install -r requirements/lock-test.txt -e ") and "pytest" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
    # from nothing: a new venv in a temporary folder, activated before the install
    before = ci_lines[: ci_lines.index(test_command)]
    assert any(re.match(r'python3 -m venv "\$[a-z_]+/venv"', line) for line in before)
    assert any("mktemp -d" in line for line in before)
    assert any(re.match(r'\. "\$[a-z_]+/venv/bin/activate"', line) for line in before)
    # a failing pytest (exit 5, "no tests collected", included) fails CI
    assert "set -euo pipefail" in ci_lines and "|| true" not in test_command


def test_demo_command_uses_the_lock_and_bundled_files_that_exist():
    demo = _bash_blocks()[0]
    assert demo.startswith("pip install -r requirements/lock.txt -e . && ")
    words = shlex.split(demo)
    assert "train" in words and "predict" in words
    data_dir = words[words.index("train") + 1]
    assert (ROOT / data_dir / "train").is_dir() and (ROOT / data_dir / "valid").is_dir()
    assert (ROOT / words[words.index("--category-names") + 1]).is_file()
    image = words[words.index("predict") + 1]
    assert (ROOT / image).is_file()
    # predict reads the checkpoint that the train step of the same command writes
    save_dir = words[words.index("--save-dir") + 1]
    assert words[words.index("--checkpoint") + 1] == f"{save_dir}/best.pt"


def test_locks_pin_the_torch_pair_that_imports_together_and_a_pytest_schemathesis_runs_on():
    for lock in ("lock.txt", "lock-test.txt"):
        pins = _pins(ROOT / "requirements" / lock)
        assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1", lock
    pins = _pins(ROOT / "requirements" / "lock-test.txt")
    assert "schemathesis" in pins
    # pytest 9.2 removed Node._nodeid, which schemathesis's pytest plugin sets
    assert tuple(int(part) for part in pins["pytest"].split(".")[:2]) < (9, 2)
    constraints = _pins(ROOT / "requirements" / "constraints.txt")
    assert all(pins[name] == version for name, version in constraints.items())


def test_locks_hold_every_declared_dependency_and_agree():
    declared = _declared()
    test_lock = _pins(ROOT / "requirements" / "lock-test.txt")
    demo_lock = _pins(ROOT / "requirements" / "lock.txt")
    # the test lock: runtime and every extra; the tests use mlflow-skinny for the mlflow extra
    wanted = set().union(*(names for group, names in declared.items() if group != "mlflow"))
    assert {"import-linter", "mlflow-skinny", "pytest"} <= wanted
    assert wanted - set(test_lock) == set()
    assert declared["mlflow"] == {"mlflow"}
    # the demo lock: runtime and plot (cnnkit train draws curves.png with matplotlib)
    assert (declared["dependencies"] | declared["plot"]) - set(demo_lock) == set()
    # one resolution: the demo installs the versions the suite was run with
    assert {name: version for name, version in demo_lock.items() if test_lock.get(name) != version} == {}


def test_lock_headers_give_the_regenerate_commands_that_the_readme_shows():
    commands = _bash_blocks()
    for lock in ("lock.txt", "lock-test.txt"):
        lines = (ROOT / "requirements" / lock).read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("# This file was autogenerated by uv")
        command = lines[1].lstrip("# ").strip()
        assert command.startswith("uv pip compile pyproject.toml ") and command.endswith(f"-o requirements/{lock}")
        assert "--python-version 3.11" in command
        assert any(command in block.splitlines() for block in commands), command
