"""README.md's "Deploy" section stays true to the files: every file it names exists, the alert
table lists exactly the alert rules, and its commands name the files they use."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -e '.[deploy]')")

ROOT = Path(__file__).resolve().parents[2]


def _section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Deploy\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "README.md has no Deploy section"
    return match[1]


def test_every_file_the_deploy_section_names_exists():
    section = _section()
    named = set(re.findall(r"(?<![\w/.$-])((?:deploy|docs|requirements|cnnkit|checkpoints)/[\w./*-]+\w)", section))
    named |= {"Dockerfile", ".dockerignore"} & set(re.findall(r"`([.\w]+)`", section))
    assert {"deploy/compose.yaml", "docs/serve-page.png", "deploy/grafana/cnnkit.json", "requirements/lock-serve.txt"} <= named
    for name in sorted(named):
        if name.startswith("checkpoints/") or name == "deploy/model/model.pt":
            continue  # what cnnkit train writes (the Quick start's demo), and a copy of it
        matches = list(ROOT.glob(name)) if "*" in name else [ROOT / name]
        assert matches and all(m.exists() for m in matches), name
    assert "![the page of cnnkit serve](docs/serve-page.png)" in section


def test_the_alert_table_lists_exactly_the_alert_rules():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules" / "cnnkit-alerts.yml").read_text())
    severity = {r["alert"]: r["labels"]["severity"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    table = dict(re.findall(r"^\| `(Cnnkit\w+)` \| (\w+) \|", _section(), flags=re.M))
    assert table == severity


def test_the_commands_start_each_part():
    section = _section()
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    commands = "\n".join(blocks)
    for needle in ("cnnkit serve ", "docker build -t cnnkit .", "docker compose -f deploy/compose.yaml up",
                   "promtool test rules deploy/prometheus/tests/cnnkit-alerts.test.yml", "kubectl apply -f deploy/k8s/deployment.yaml",
                   "aws sagemaker create-endpoint ", "aws sagemaker-runtime invoke-endpoint"):
        assert needle in commands, needle
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key", section)  # no credentials
