"""deploy/k8s: the manifests validated against the Kubernetes API's own JSON schemas
(kubernetes-validate, strict: an unknown or misspelled field is an error) for the oldest and the
newest Kubernetes they are meant for; the objects agree with each other and with what
``cnnkit serve`` makes of the Deployment's arguments (sizes, timeouts); the Indexed Job's shards,
run for real with ``cnnkit predict``, score every image exactly once. The probes, the port and
the scrape annotations are checked against the running server in test_deploy_container.py.
"""

from __future__ import annotations

import copy
import csv
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -e '.[deploy]')")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the deploy extra)")

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())  # what the manifests are for: 1.30 and newer


def _objects() -> dict[str, dict]:
    found = {}
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            found[f"{document['kind']}/{document['metadata']['name']}"] = document
    return found


def _container(workload: dict) -> dict:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_the_manifests_are_valid_kubernetes_objects(path):
    for document in yaml.safe_load_all(path.read_text()):
        for version in VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)


def test_the_validation_catches_a_misspelled_field_and_a_wrong_type():
    deployment = _objects()["Deployment/cnnkit"]
    misspelled = copy.deepcopy(deployment)
    container = _container(misspelled)
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelled, VERSIONS[-1], strict=True)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, VERSIONS[-1], strict=True)


def test_the_objects_refer_to_each_other():
    objects = _objects()
    assert set(objects) == {"Deployment/cnnkit", "Service/cnnkit", "HorizontalPodAutoscaler/cnnkit",
                            "PodDisruptionBudget/cnnkit", "PersistentVolumeClaim/cnnkit-model", "Job/cnnkit-batch-score"}
    deployment = objects["Deployment/cnnkit"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = objects["Service/cnnkit"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in _container(deployment)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert objects["PodDisruptionBudget/cnnkit"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    target = objects["HorizontalPodAutoscaler/cnnkit"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "cnnkit")
    assert objects["PodDisruptionBudget/cnnkit"]["spec"]["minAvailable"] < \
        objects["HorizontalPodAutoscaler/cnnkit"]["spec"]["minReplicas"]
    for workload in (deployment, objects["Job/cnnkit-batch-score"]):
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        (model,) = [m for m in _container(workload)["volumeMounts"] if m["mountPath"] == "/opt/ml/model"]
        assert model["readOnly"] is True
        assert volumes[model["name"]]["persistentVolumeClaim"]["claimName"] == "cnnkit-model"


def test_the_deployment_is_sized_and_timed_as_cnnkit_serve_reads_its_arguments(monkeypatch):
    from cnnkit.cli import main
    from cnnkit.config import ServeConfig
    from cnnkit.serve import gunicorn_options

    deployment = _objects()["Deployment/cnnkit"]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    # the image's entrypoint is cnnkit and its environment names the model (the Dockerfile's ENV)
    monkeypatch.setenv("CNNKIT_MODEL", "/opt/ml/model")
    assert container["args"][0] == "serve"
    context = main.get_command(None, "serve").make_context("serve", list(container["args"][1:]))
    cfg = ServeConfig(**context.params)
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert cfg.workers * cfg.torch_threads == _cpus(limits["cpu"]) == _cpus(requests["cpu"])  # workers never fight over cores
    assert requests["memory"] == limits["memory"]
    # SIGTERM: the preStop sleep, then gunicorn's graceful shutdown (requests in flight finish),
    # all within the grace period
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > sleep + gunicorn_options(cfg)["graceful_timeout"]
    assert gunicorn_options(cfg)["graceful_timeout"] >= cfg.timeout
    # a read-only root: the server's only writes (the Prometheus multi-process folder) go to /tmp
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001


def test_the_indexed_job_scores_every_image_exactly_once(tmp_path):
    from click.testing import CliRunner

    from cnnkit.cli import main
    from deploy_helpers import image_bytes, make_checkpoint

    job = _objects()["Job/cnnkit-batch-score"]
    assert job["spec"]["completionMode"] == "Indexed"
    shards = job["spec"]["completions"]
    container = _container(job)
    args = container["args"]
    assert args[0] == "predict" and args[args.index("--shard") + 1] == f"$(JOB_COMPLETION_INDEX)/{shards}"
    # the pod's volumes, here: the images, the model (model.pt), the results
    mounts = {m["mountPath"]: tmp_path / m["name"] for m in container["volumeMounts"]}
    for folder in mounts.values():
        folder.mkdir()
    images = mounts["/data/images"]
    names = [f"photo-{word}-{i}.png" for i, word in enumerate("ash birch cedar elm fir hazel larch maple oak pine yew rowan".split())]
    for i, name in enumerate(names):
        (images / name).write_bytes(image_bytes(i, size=(40, 32)))
    make_checkpoint(mounts["/opt/ml/model"] / "model.pt")

    def run(index: int) -> None:
        words = [re.sub(r"\$\(JOB_COMPLETION_INDEX\)", str(index), word) for word in args]
        for mount, folder in mounts.items():
            words = [str(folder) + word[len(mount):] if word.startswith(mount) else word for word in words]
        result = CliRunner().invoke(main, words, catch_exceptions=False)
        assert result.exit_code == 0, result.output

    for index in range(shards):
        run(index)
    run(1)  # a retried pod (same index): --resume adds nothing twice
    rows = []
    for output in sorted(mounts["/results"].glob("scores.*.csv")):
        with open(output, newline="") as handle:
            rows += [Path(row["path"]).name for row in csv.DictReader(handle)]
    assert len(list(mounts["/results"].glob("scores.*.csv"))) == shards
    assert sorted(rows) == sorted(names)  # every image once
