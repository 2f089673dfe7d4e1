"""POST /explain (cnnkit.serve.explainer): Grad-CAM pictures from the real server (gunicorn
subprocess), checked against ``cnnkit explain`` and ``/predict``; and the explainer in-process
(an exported model, a busy worker, the private copy of the model)."""

from __future__ import annotations

import dataclasses
import io
import json
import threading
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("flask")
pytest.importorskip("gunicorn")
pytest.importorskip("captum")

from cnnkit.config import ExplainConfig, ServeConfig  # noqa: E402
from cnnkit.serve.explainer import Explainer  # noqa: E402
from cnnkit.serve.model import load_served_model  # noqa: E402
from cnnkit.serve.parsing import HttpError  # noqa: E402

from deploy_helpers import CLASSES, NAMES, http, image_bytes, make_checkpoint, multipart, post_images  # noqa: E402
from http_server import start_server  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("explain") / "model.pt")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    instance = start_server(checkpoint, tmp_path_factory.mktemp("explain-log") / "server.log", "--max-images", "4",
                            workers=1, timeout=20)
    try:
        yield instance
    finally:
        instance.stop()


def explain(server, data: bytes, query: str = "", name: str = "photo.png"):
    body, content_type = multipart([("image", name, data)])
    return http(server.base, "POST", "/explain" + query, body, content_type)


def test_the_picture_is_what_cnnkit_explain_draws_for_the_served_top_class(server, checkpoint, tmp_path):
    from cnnkit.explain import explain as run_explain

    data = image_bytes(3)
    answer = explain(server, data)
    assert answer.status == 200, answer.text
    assert answer.headers["Content-Type"] == "image/png" and answer.headers["Cache-Control"] == "no-store"
    (top,) = post_images(server.base, [data]).json["results"][0]["predictions"]
    assert unquote(answer.headers["X-Class-Label"]) == top["label"]
    assert unquote(answer.headers["X-Class-Name"]) == NAMES[top["label"]]
    assert float(answer.headers["X-Class-Probability"]) == pytest.approx(top["probability"], abs=1e-4)
    assert answer.headers["X-Class-Rank"] == "1" and answer.headers["X-Explain-Method"] == "gradcam"
    assert answer.headers["X-Model-Version"].startswith("sha256:")

    (tmp_path / "photo.png").write_bytes(data)
    (row,) = run_explain(ExplainConfig((str(tmp_path / "photo.png"),), str(checkpoint), str(tmp_path / "out"),
                                       top_k=1, device="cpu")).rows
    served = np.asarray(Image.open(io.BytesIO(answer.body)).convert("RGB"), dtype=np.int16)
    written = np.asarray(Image.open(row.file).convert("RGB"), dtype=np.int16)
    assert served.shape == written.shape
    assert np.abs(served - written).mean() < 1.0  # the same picture (up to float rounding across processes)


def test_a_class_by_name_or_label_and_grad_cam_plus_plus(server):
    data = image_bytes(5)
    ranked = post_images(server.base, [data], "?top_k=3").json["results"][0]["predictions"]
    last = ranked[-1]
    for query in (f"?class={last['label']}", f"?class={last['name'].replace(' ', '%20')}&method=gradcam%2B%2B"):
        answer = explain(server, data, query)
        assert answer.status == 200, answer.text
        assert unquote(answer.headers["X-Class-Label"]) == last["label"] and answer.headers["X-Class-Rank"] == "3"
        assert float(answer.headers["X-Class-Probability"]) == pytest.approx(last["probability"], abs=1e-4)
    assert answer.headers["X-Explain-Method"] == "gradcam++"
    assert Image.open(io.BytesIO(answer.body)).format == "PNG"


def test_a_raw_image_body_and_json_base64_are_explained_too(server):
    import base64

    data = image_bytes(7)
    raw = http(server.base, "POST", "/explain", data, "image/png")
    as_json = http(server.base, "POST", "/explain", json.dumps({"image": base64.b64encode(data).decode()}).encode(),
                   "application/json")
    assert raw.status == as_json.status == 200
    assert raw.headers["X-Class-Label"] == as_json.headers["X-Class-Label"]


@pytest.mark.parametrize("query, files, status, fragment", [
    ("?class=wolf", None, 400, "'wolf' is not a class of this model; its labels: cat, dog, fox"),
    ("?method=lime", None, 400, "method must be one of gradcam, gradcam++"),
    ("?class=", None, 400, "class must be a class label or name"),
    ("", [image_bytes(1), image_bytes(2)], 400, "/explain takes one image, got 2"),
    ("", [b"not an image"], 422, "the image"),
])
def test_bad_requests_are_one_json_error(server, query, files, status, fragment):
    files = files or [image_bytes(0)]
    body, content_type = multipart([("image", f"{i}.png", data) for i, data in enumerate(files)])
    answer = http(server.base, "POST", "/explain" + query, body, content_type)
    assert answer.status == status and answer.json["status"] == status
    assert fragment in answer.json["error"] and "\n" not in answer.json["error"]


def test_explanations_are_counted_as_requests_of_their_own(server):
    from deploy_helpers import metric, metric_values

    before = metric(metric_values(http(server.base, "GET", "/metrics").text), "cnnkit_requests_total",
                    endpoint="/explain", status="200")
    assert explain(server, image_bytes(9)).status == 200
    after = metric(metric_values(http(server.base, "GET", "/metrics").text), "cnnkit_requests_total",
                   endpoint="/explain", status="200")
    assert after == before + 1


# --- in-process -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(checkpoint):
    return load_served_model(ServeConfig(str(checkpoint), device="cpu"), str(checkpoint))


def _image(model) -> torch.Tensor:
    return model.transform(Image.open(io.BytesIO(image_bytes(4))).convert("RGB"))


def test_an_exported_model_cannot_be_explained(served):
    with pytest.raises(HttpError) as info:
        Explainer().explain(dataclasses.replace(served, backend="onnxruntime"), _image(served), None, "gradcam", 5)
    assert info.value.status == 501 and "serve the .pt checkpoint" in info.value.message


def test_a_busy_worker_answers_503_with_retry_after(served):
    explainer = Explainer()
    with explainer.turn:  # another request is being explained
        with pytest.raises(HttpError) as info:
            explainer.explain(served, _image(served), None, "gradcam", 0.05)
    assert info.value.status == 503 and info.value.headers["Retry-After"] == "1"


def test_explanations_use_a_copy_of_the_model_made_once_per_version(served):
    explainer = Explainer()
    image = _image(served)
    first = explainer.explain(served, image, None, "gradcam", 5)
    kept = explainer.copied
    assert explainer.explain(served, image, "Dog", "gradcam", 5).label == "dog"
    assert explainer.copied is kept and kept is not served.predictor.model
    newer = dataclasses.replace(served, version="sha256:" + "0" * 16)
    assert explainer.explain(newer, image, None, "gradcam", 5).version == newer.version
    assert explainer.copied is not kept
    # the served model never carries the explainer's hooks, so concurrent scoring is untouched
    modules = list(served.predictor.model.modules())
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in modules)
    probs = served.score(image[None])
    assert first.label == CLASSES[int(probs.argmax())]


def test_concurrent_explanations_of_one_worker_take_turns(served):
    explainer, image, answers = Explainer(), _image(served), []
    threads = [threading.Thread(target=lambda: answers.append(explainer.explain(served, image, None, "gradcam", 30)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 3 and len({a.png for a in answers}) == 1
