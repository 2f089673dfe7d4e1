"""gunicorn settings and hooks for serving ``cnnkit.serve:create_app``.

``cnnkit serve`` loads this module itself (then applies its flags on top). To run the app with
gunicorn's own command line instead, pass it with ``-c`` and give Prometheus a fresh folder::

    PROMETHEUS_MULTIPROC_DIR=$(mktemp -d) gunicorn -c python:cnnkit.gunicorn_conf \\
        --workers 2 --threads 64 --bind 127.0.0.1:8000 "cnnkit.serve:create_app('best.pt', workers=2)"

Every module-level name that is a gunicorn setting is applied, so this module defines nothing else.
"""

from __future__ import annotations

import os
import re

from .serve.metrics import multiprocess_dir as _metrics_dir  # private here: not a gunicorn setting

# gthread (request threads feed each worker's micro-batcher), with a deadline on reading each
# request and JSON error bodies for the errors gunicorn answers itself
worker_class = "cnnkit.serve.BoundedThreadWorker"
threads = 64
preload_app = False  # the model loads in each worker, after the fork, never in the master
accesslog = None  # the app logs one JSON line per request instead
keepalive = 5
control_socket_disable = True  # gunicorn >= 25: one control socket per user would clash between servers

_PROMETHEUS_FILE = re.compile(r"^(counter|gauge_[a-z]+|histogram|summary)_\d+\.db$")


def on_starting(server) -> None:
    """Remove Prometheus files left by an earlier run (only those: the folder may hold others)."""
    folder = _metrics_dir()
    if folder and os.path.isdir(folder):
        for name in os.listdir(folder):
            if _PROMETHEUS_FILE.match(name):
                os.unlink(os.path.join(folder, name))


def child_exit(server, worker) -> None:
    """A worker is gone: drop its live gauges from the multi-process metrics."""
    if _metrics_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
