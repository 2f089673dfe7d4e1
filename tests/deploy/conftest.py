"""The deployment tests' server: the Dockerfile's install and start lines, run once for the
session (image_steps.py: a new virtual environment stands for the image's Python), and the
``cnnkit serve`` that its ENTRYPOINT + CMD start, with a model where SageMaker puts it. The page
(a real Chromium), Prometheus (a real one scraping it), SageMaker and Kubernetes tests all talk to
that one server.

With ``CNNKIT_UPDATE_DOCS=1`` the server serves ``checkpoints/demo/best.pt`` (the README's demo
model) when it exists, so that the page's screenshot (docs/serve-page.png) shows flower names.
"""

from __future__ import annotations

import pytest

from image_steps import Container, ImageSteps, build_image, start


@pytest.fixture(scope="session")
def image(tmp_path_factory) -> ImageSteps:
    """The image, standing in a venv that also sees the test environment's packages (so that the
    lock's install finds them there: seconds; the from-nothing install is a slow test)."""
    for module in ("flask", "gunicorn", "prometheus_client"):
        pytest.importorskip(module)
    return build_image(tmp_path_factory.mktemp("image"), overlay=True)


@pytest.fixture(scope="session")
def container(image, tmp_path_factory) -> Container:
    from deploy_helpers import free_port

    server = start(image, tmp_path_factory.mktemp("container") / "server.log", free_port())
    yield server
    server.stop()
