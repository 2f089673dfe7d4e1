#!/usr/bin/env bash
# What would the newest releases break? Not part of CI: run it by hand before moving the lock.
#
#   scripts/check-newest.sh [REQUIREMENT...] [-- PYTEST_ARGS...]
#
# In a scratch virtual environment (a temporary folder, removed at the end) it installs cnnkit with
# every extra from pyproject.toml's RANGES, not the lock, upgrading each package to the newest
# release they allow; then installs each REQUIREMENT on top (to try a release past an upper bound,
# e.g. 'pytest==9.2.0'; pip warns that it conflicts with the range); prints every package whose
# version differs from requirements/lock-test.txt; and runs the suite (python -m pytest
# PYTEST_ARGS). Its exit status is pytest's. When it passes, move the lock forward on purpose:
# README.md, "Dependencies and the lock".
#
# On this project's machines pip's global constraint file (/etc/xdg/pip/constraints.txt) caps
# torch/torchvision at the pair on local disk; NEWEST_TORCH=1 lifts it for this run only (the newest
# torch with its CUDA wheels is a download of several GB). It does not change that file.
set -euo pipefail
cd "$(dirname "$0")/.."

requirements=()
while (($#)) && [[ $1 != -- ]]; do requirements+=("$1"); shift; done
(($#)) && shift  # the --

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
# shellcheck disable=SC1091
. "$scratch/venv/bin/activate"
if [[ ${NEWEST_TORCH:-0} == 1 ]]; then
    export PIP_CONSTRAINT=/dev/null
fi

pip install --upgrade pip
pip install --upgrade --upgrade-strategy eager -e ".[test,serve,export,plot]"
if ((${#requirements[@]})); then
    pip install --upgrade "${requirements[@]}"
fi

echo "--- newest installed vs requirements/lock-test.txt (name: lock -> here)"
pip list --format=freeze --exclude-editable | python3 -c '
import re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
lock = {}
for line in open("requirements/lock-test.txt"):
    m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
    if m:
        lock[norm(m[1])] = m[2]
here = dict(line.strip().split("==", 1) for line in sys.stdin if "==" in line)
here = {norm(name): version for name, version in here.items()}
for name in sorted(set(lock) | set(here)):
    if name != "pip" and lock.get(name) != here.get(name):
        print("  %s: %s -> %s" % (name, lock.get(name, "-"), here.get(name, "-")))
'
echo "--- python -m pytest $*"
python -m pytest "$@"
