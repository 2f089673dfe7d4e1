"""``cnnkit serve``'s launcher: check the model and the port in the master, then run the app under
gunicorn (:func:`serve`), with the settings of :mod:`cnnkit.gunicorn_conf` and the config's on top.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
import tempfile
from typing import Any

from ..config import ServeConfig
from ..errors import CnnkitError, ConfigError, require_extra
from ..models.exported import checkpoint_from_metadata, export_format, is_exported_model, read_metadata, require_runtime
from .app import create_app
from .auth import ApiKeys
from .control import CONTROL_DIR_ENV
from .model import model_file
from .sizing import torch_threads, worker_count

log = logging.getLogger(__name__)


def gunicorn_options(cfg: ServeConfig) -> dict[str, Any]:
    """gunicorn settings for ``cfg`` (on top of those in :mod:`cnnkit.gunicorn_conf`)."""
    host = f"[{cfg.host}]" if ":" in cfg.host and not cfg.host.startswith("[") else cfg.host
    options: dict[str, Any] = {
        "bind": [f"{host}:{cfg.port}"],
        "workers": worker_count(cfg),
        "threads": cfg.threads,
        # A worker whose main loop is silent this long is restarted; requests time out before.
        "timeout": int(max(30, 2 * cfg.timeout)),
        "graceful_timeout": int(max(10, cfg.timeout)),
        "errorlog": "-",
        "loglevel": "info" if logging.getLogger("cnnkit").getEffectiveLevel() <= logging.INFO else "warning",
        "proc_name": "cnnkit-serve",
        "preload_app": False,
        "control_socket_disable": True,  # gunicorn >= 25: one shared control socket would clash between servers
    }
    if os.path.isdir("/dev/shm"):
        options["worker_tmp_dir"] = "/dev/shm"  # heartbeat files off slow or overlay disks
    return options


def _check_models(cfg: ServeConfig) -> str:
    """Fail fast, in the master, on a model file the workers could not load, or a canary or
    shadow whose classes are not the primary's; a one-line summary."""
    primary, summary = _check_model(cfg, cfg.checkpoint)
    for flag, path in (("--canary", cfg.canary), ("--shadow", cfg.shadow)):
        if path is None:
            continue
        candidate, line = _check_model(cfg, path)
        if candidate.classes != primary.classes:
            raise ConfigError(f"{flag} {path}: its classes differ from {cfg.checkpoint}'s ({len(candidate.classes)} vs "
                              f"{len(primary.classes)}, or in order); a candidate must answer with the same classes")
        summary += f"; {flag[2:]} {line}"
    return summary


def _check_model(cfg: ServeConfig, path: str) -> tuple[Any, str]:
    """The checkpoint (or an export's metadata) at ``path`` and a one-line summary; raises
    CnnkitError where a worker could not load it.

    No model runs before gunicorn forks its workers, and what torch does here (loading the
    checkpoint hashes its weights, which copies channels-last tensors, as training saves them,
    with a parallel loop) runs on one thread: a thread pool started in the master would not
    survive the fork, and each worker would hang at its first parallel operation.
    """
    from ..data.folders import load_category_names

    if is_exported_model(path):
        require_runtime(path)
        ckpt = checkpoint_from_metadata(read_metadata(path), path)
        kind = {"onnx": "ONNX", "openvino": "OpenVINO"}[export_format(path)] + " model"
    else:
        import torch

        from ..models.checkpoint import load_checkpoint

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ckpt = load_checkpoint(path)
        finally:
            torch.set_num_threads(threads)  # (sets the count only: no thread starts until a parallel loop)
        kind = "checkpoint"
    if cfg.category_names:
        load_category_names(cfg.category_names, ckpt.classes)
    drift = "with" if getattr(ckpt, "reference_stats", None) else "without"
    return ckpt, f"{kind} {path}: {ckpt.arch}, {len(ckpt.classes)} classes, {drift} drift reference"


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or --host") from None


def serve(cfg: ServeConfig) -> None:
    """Run the server in the foreground until stopped (SIGTERM: graceful, requests in flight finish; Ctrl-C: at once)."""
    require_extra("serve", "flask", "gunicorn", "prometheus_client")
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter

    cfg = dataclasses.replace(cfg, checkpoint=model_file(cfg.checkpoint), canary=cfg.canary and model_file(cfg.canary),
                              shadow=cfg.shadow and model_file(cfg.shadow))
    summary = _check_models(cfg)
    keys = ApiKeys.from_file(cfg.api_key_file) if cfg.api_key_file else None
    _check_port(cfg.host, cfg.port)

    class ReloadingArbiter(Arbiter):
        def handle_hup(self) -> None:
            # gunicorn's HUP restarts every worker with the configuration it started with: a
            # checkpoint that fails to load would then stop the server. Here each worker loads
            # the model in place instead, and keeps the old one if the new one fails.
            self.log.info("Hang up: every worker reloads the model")
            self.kill_workers(signal.SIGHUP)

    class Application(BaseApplication):
        def run(self) -> None:
            try:
                ReloadingArbiter(self).run()
            except RuntimeError as exc:  # as gunicorn's own run(): a one-line error, not a traceback
                raise CnnkitError(f"gunicorn: {exc}") from None

        def load_config(self) -> None:
            from .. import gunicorn_conf

            settings = {k: v for k, v in vars(gunicorn_conf).items() if not k.startswith("_")}
            for key, value in {**settings, **gunicorn_options(cfg)}.items():
                if key in self.cfg.settings:  # as gunicorn's -c: names that are not settings are skipped
                    self.cfg.set(key, value)

        def load(self):
            try:
                return create_app(cfg.checkpoint, cfg)
            except CnnkitError as exc:
                log.error("cannot load the model: %s", exc)
                raise SystemExit(4) from None  # gunicorn: "App failed to load", the master stops

    folders = {"PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="cnnkit-metrics-"),  # read in the workers
               CONTROL_DIR_ENV: tempfile.mkdtemp(prefix="cnnkit-control-")}  # the model a reload names
    previous = {name: os.environ.get(name) for name in folders}
    os.environ.update(folders)
    log.info(
        "serving %s on http://%s:%d with %d worker(s) x %d threads, %d torch thread(s) per worker, "
        "batches of up to %d (wait up to %g ms), %s; SIGHUP (or POST /admin/reload) reloads the model",
        summary, cfg.host, cfg.port, worker_count(cfg), cfg.threads, torch_threads(cfg), cfg.max_batch, cfg.max_wait_ms,
        f"{len(keys)} API key(s)" if keys else "no API keys (open to anyone who can connect)",
    )
    try:
        Application().run()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise CnnkitError(f"the server stopped with an error (gunicorn exit status {exc.code}); see the log above") from None
    finally:
        for name, folder in folders.items():
            shutil.rmtree(folder, ignore_errors=True)
            if previous[name] is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = previous[name]
