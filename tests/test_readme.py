"""The README's two fresh-machine commands stay in step with CI and with the files they use."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    test_command = _bash_blocks()[1]
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_demo_command_uses_bundled_files_that_exist():
    demo = _bash_blocks()[0]
    assert demo.startswith("pip install -r requirements.txt -e .")
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


def test_install_path_pins_the_torch_pair_that_imports_together():
    requirements = (ROOT / "requirements.txt").read_text()
    assert "torch==2.14.1" in requirements and "torchvision==0.29.1" in requirements
