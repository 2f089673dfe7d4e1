"""The Dockerfile without a container engine: its instructions parsed, its ``.dockerignore``
applied as Docker applies it, and its install and start steps run in a virtual environment that
stands for the image's Python (conftest.py here runs them once for all the deployment tests).

No engine on this project's machines can pull a base image, so :class:`ImageSteps` replays the
Dockerfile's own lines instead: ``ARG``/``ENV`` become the environment, ``COPY`` copies from the
build context (what ``.dockerignore`` lets through) into a scratch folder that stands for the
image's ``/`` (every absolute path under ``/opt`` or ``/tmp`` in a command is mapped into it),
``RUN`` lines that install with pip run as written with the venv's ``pip`` first on ``PATH``,
and ``ENTRYPOINT`` + ``CMD`` start the server the way ``docker run IMAGE`` would.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from http_server import request_records, stop_process

ROOT = Path(__file__).resolve().parents[2]


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined, comments dropped."""
    found, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # (inside a continuation too, as Docker does)
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, arguments = current.partition(" ")
        found.append((keyword.upper(), arguments.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continuation"
    return found


def key_values(arguments: str) -> dict[str, str]:
    """``ENV``/``ARG`` arguments: ``A=1 B="x y"`` (or the old ``KEY value`` form)."""
    words = shlex.split(arguments)
    if len(words) >= 2 and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) if "=" in word else (word, "") for word in words)


def expand(text: str, variables: dict[str, str]) -> str:
    """``$VAR`` and ``${VAR}`` as Docker substitutes them in COPY, ENV and the like."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], ""), text)


# --- .dockerignore ------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go's filepath.Match with ``**``, as moby's patternmatcher)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1:end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def dockerignore(path: Path = ROOT / ".dockerignore") -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        rules.append((keep, _pattern_regex(os.path.normpath(line.lstrip("!")).strip("/"))))
    return rules


def in_context(relative: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether the build context holds ``relative``: the last pattern that matches it, or one of
    its parent folders, decides (``!`` keeps)."""
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for keep, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            included = keep
    return included


def context_files(rules: list[tuple[bool, re.Pattern]]) -> list[str]:
    """Every file of the repository that goes into the build context (relative paths)."""
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), ROOT)
            if in_context(relative, rules):
                files.append(relative)
    return sorted(files)


# --- the steps, replayed ---------------------------------------------------------------------


@dataclass
class ImageSteps:
    """The Dockerfile replayed into ``root`` (standing for the image's ``/``) with the Python of
    ``venv`` standing for the image's."""

    root: Path
    venv: Path
    build_args: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    def map_paths(self, text: str) -> str:
        return re.sub(r"(?<![\w./])(/(?:opt|tmp)/)", lambda m: str(self.root) + m[1], text)

    def process_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a RUN line or of the container: ENV (paths mapped), pip's settings
        of this machine, the venv first on PATH, and nothing of the test's own Python."""
        keep = {k: v for k, v in os.environ.items() if k.startswith(("PIP_", "LANG", "LC_", "HOME", "TMPDIR", "SSL_"))
                or k in ("http_proxy", "https_proxy", "no_proxy")}
        env = {**keep, **{k: self.map_paths(v) for k, v in self.env.items()}, **(extra or {})}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin"
        return env

    def replay(self, dockerfile: Path, log: Path, timeout: float = 1200) -> None:
        rules = dockerignore(dockerfile.parent / ".dockerignore")
        for keyword, arguments in instructions(dockerfile.read_text()):
            variables = {**self.args, **self.env}
            if keyword == "ARG":
                for key, default in key_values(arguments).items():
                    self.args[key] = self.build_args.get(key, default)
            elif keyword == "ENV":
                self.env.update({k: expand(v, variables) for k, v in key_values(arguments).items()})
            elif keyword == "WORKDIR":
                self.workdir = expand(arguments, variables)
                self.path(self.workdir).mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                words = [w for w in shlex.split(expand(arguments, variables)) if not w.startswith("--")]
                self._copy(words[:-1], words[-1], rules)
            elif keyword == "RUN":
                command = expand(arguments, {}) if arguments.startswith("[") else arguments
                if not command.startswith("pip "):
                    self.skipped.append(command)  # (useradd: the image's user, not this machine's)
                    continue
                started = time.monotonic()
                with open(log, "ab") as out:
                    out.write(f"\n$ {command}\n".encode())
                    out.flush()
                    subprocess.run(["sh", "-c", self.map_paths(command)], cwd=self.path(self.workdir), check=True,
                                   env=self.process_env(self.args), stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
                    out.write(f"({time.monotonic() - started:.1f} s)\n".encode())
                self.ran.append(command)
            elif keyword == "ENTRYPOINT":
                self.entrypoint = json.loads(arguments)
            elif keyword == "CMD":
                self.cmd = json.loads(arguments)
            elif keyword == "HEALTHCHECK":
                self.healthcheck = json.loads(arguments[arguments.index("CMD ") + 4:])

    def _copy(self, sources: list[str], destination: str, rules) -> None:
        target = self.path(destination)
        for source in sources:
            source = source.rstrip("/") or "."
            origin = ROOT / source
            if origin.is_dir():
                for folder, _, names in os.walk(origin):
                    for name in names:
                        relative = os.path.relpath(os.path.join(folder, name), ROOT)
                        if in_context(relative, rules):
                            copy_to = target / os.path.relpath(os.path.join(folder, name), origin)
                            copy_to.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(os.path.join(folder, name), copy_to)
            else:
                assert in_context(source, rules), f"COPY {source}: left out of the build context by .dockerignore"
                copy_to = target / origin.name if destination.endswith("/") else target
                copy_to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, copy_to)

    def command(self) -> list[str]:
        """ENTRYPOINT + CMD, as ``docker run IMAGE`` runs them (the venv's executables)."""
        words = self.entrypoint + self.cmd
        return [str(self.venv / "bin" / words[0])] + words[1:]

    def healthcheck_command(self) -> list[str]:
        return [str(self.venv / "bin" / self.healthcheck[0])] + self.healthcheck[1:]


def new_venv(folder: Path, overlay: bool) -> Path:
    """A new virtual environment; with ``overlay``, the test environment's packages are visible
    in it (after its own), so that installing the lock finds them already there."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True)
    if overlay:
        import site

        (site_packages,) = (folder / "lib").glob("python*/site-packages")
        lines = "".join(f"import site; site.addsitedir({path!r})\n" for path in site.getsitepackages())
        (site_packages / "zz_test_environment.pth").write_text(lines)
    return folder


@dataclass
class Container:
    """A server started as ``docker run`` starts the image (:func:`start`)."""

    steps: ImageSteps
    process: subprocess.Popen
    base: str
    env: dict[str, str]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def server_errors(self) -> list[dict]:
        """The request log's 5xx lines (but /ready's and /ping's 503s while warming up)."""
        records = request_records(self.log_text())
        return [r for r in records if r.get("status", 0) >= 500 and r.get("path") not in ("/ready", "/ping")]

    def stop(self) -> None:
        stop_process(self.process)


def start(steps: ImageSteps, log: Path, port: int, **run_env: str) -> Container:
    """``docker run -e SAGEMAKER_BIND_TO_PORT=PORT -e CNNKIT_HOST=127.0.0.1 -e CNNKIT_WORKERS=1
    [-e ...] IMAGE``: ENTRYPOINT + CMD in the image's environment, until /ping answers 200."""
    from deploy_helpers import http

    env = steps.process_env({"SAGEMAKER_BIND_TO_PORT": str(port), "CNNKIT_HOST": "127.0.0.1", "CNNKIT_WORKERS": "1",
                             **run_env})
    with open(log, "ab") as out:
        process = subprocess.Popen(steps.command(), cwd=steps.path(steps.workdir), env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    container = Container(steps, process, f"http://127.0.0.1:{port}", env, log)
    deadline = time.monotonic() + 120
    try:
        while True:
            assert process.poll() is None, container.log_text()[-4000:]
            try:
                if http(container.base, "GET", "/ping", timeout=5).status == 200:
                    return container
            except OSError:
                pass
            assert time.monotonic() < deadline, container.log_text()[-4000:]
            time.sleep(0.1)
    except BaseException:
        container.stop()
        raise


DOCKERFILE = ROOT / "Dockerfile"
DEMO_MODEL = ROOT / "checkpoints" / "demo" / "best.pt"
UPDATE_DOCS = os.environ.get("CNNKIT_UPDATE_DOCS") == "1"


def build_image(folder: Path, overlay: bool) -> ImageSteps:
    """The Dockerfile's lines replayed into ``folder`` (build argument TORCH_INDEX_URL empty:
    PyTorch's own index is not reachable here; torch comes from the pip index, as locked), then
    a model put in /opt/ml/model as ``docker run -v MODEL:/opt/ml/model`` would."""
    from deploy_helpers import make_checkpoint

    steps = ImageSteps(root=folder / "image", venv=new_venv(folder / "venv", overlay), build_args={"TORCH_INDEX_URL": ""})
    steps.replay(DOCKERFILE, folder / "build.log")
    model = steps.path("/opt/ml/model") / "model.pt"
    if UPDATE_DOCS and DEMO_MODEL.is_file():
        shutil.copy(DEMO_MODEL, model)
    else:
        channels_last(make_checkpoint(model))
    return steps


def channels_last(path: Path) -> Path:
    """Re-save a checkpoint with its convolution weights channels-last, as cnnkit train saves them
    (the server once hung on such weights: its master started torch's thread pool before forking)."""
    import torch

    from cnnkit.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    ckpt.state_dict = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                       for k, v in ckpt.state_dict.items()}
    ckpt.save(path)
    assert not load_checkpoint(path).state_dict["conv1.weight"].is_contiguous()
    return path
