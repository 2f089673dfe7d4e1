"""Optional experiment tracking with MLflow (``cnnkit train --mlflow``, the ``mlflow`` extra).

The tracking store and experiment come from MLflow's own environment variables:
``MLFLOW_TRACKING_URI`` (e.g. ``http://mlflow:5000``, ``sqlite:///mlflow.db`` or ``file:./mlruns``)
and ``MLFLOW_EXPERIMENT_NAME`` (default here: ``cnnkit``). The client API is used rather than
MLflow's global "active run", so a library caller's own runs are left alone.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ...errors import ConfigError, OutputError, first_line
from ..rundir import BEST, CURVES, METRICS
from .base import Callback

if TYPE_CHECKING:
    from ..loop import Trainer

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "cnnkit"
_METRIC_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr")


def _import_mlflow():
    try:
        import mlflow
    except ImportError:
        raise ConfigError("--mlflow needs MLflow, which is not installed: pip install 'cnnkit[mlflow]'") from None
    return mlflow


class MlflowTracker:
    """One MLflow run: params once, metrics per epoch, files as artifacts.

    A failure after the run has started (the server went away) is logged once and tracking
    stops: losing a chart is no reason to lose a training run.
    """

    def __init__(self, client: Any, run_id: str, uri: str):
        self.client, self.run_id, self.uri = client, run_id, uri
        self._failed = False

    @classmethod
    def start(cls, params: Mapping[str, Any], run_name: str, run_id: str | None = None) -> "MlflowTracker":
        """Create a run (or continue ``run_id``, the run of a resumed training) and log ``params``."""
        mlflow = _import_mlflow()
        uri = mlflow.get_tracking_uri()
        try:
            client = mlflow.MlflowClient()
            if run_id is not None:
                try:
                    client.update_run(run_id, status="RUNNING")
                    log.info("MLflow: continuing run %s at %s", run_id, uri)
                    return cls(client, run_id, uri)
                except Exception:  # deleted, or another store: start a new run instead
                    log.warning("MLflow run %s not found at %s; starting a new run", run_id, uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            run = client.create_run(experiment_id, run_name=run_name, tags={"mlflow.source.name": "cnnkit train"})
            tracker = cls(client, run.info.run_id, uri)
            from mlflow.entities import Param

            client.log_batch(tracker.run_id, params=[Param(k, _param_value(v)) for k, v in sorted(params.items())])
        except ConfigError:
            raise
        except Exception as exc:
            raise OutputError(f"--mlflow: cannot start a run at {uri}: {first_line(exc)}") from None
        log.info("MLflow: run %s in experiment %r at %s", tracker.run_id, name, uri)
        return tracker

    def _call(self, what: str, action) -> None:
        if self._failed:
            return
        try:
            action()
        except Exception as exc:
            self._failed = True
            log.warning("MLflow: %s failed (%s); tracking stops, training goes on", what, first_line(exc))

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """The metrics of one metrics.jsonl row, at step = its epoch."""
        from mlflow.entities import Metric

        step, stamp = int(row["epoch"]), int(time.time() * 1000)
        metrics = [Metric(k, float(row[k]), stamp, step) for k in _METRIC_KEYS if k in row]
        self._call("logging metrics", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def log_artifacts(self, paths: Iterable[str]) -> None:
        for path in paths:
            if os.path.exists(path):
                self._call(f"uploading {os.path.basename(path)}", lambda p=path: self.client.log_artifact(self.run_id, p))

    def finish(self, status: str = "FINISHED") -> None:
        self._call("closing the run", lambda: self.client.set_terminated(self.run_id, status=status))


def check_available() -> None:
    """Raise the one-line ConfigError when MLflow is not installed."""
    _import_mlflow()


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."




class MlflowCallback(Callback):
    """``--mlflow``: the run's params at the start, each epoch's metrics row, best.pt, metrics.jsonl
    and curves.png as artifacts at the end; a resumed training continues its MLflow run."""

    main_only = True

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.tracker: MlflowTracker | None = None

    def before_fit(self, trainer: Trainer) -> None:
        run, cfg = trainer.run, trainer.cfg
        params = {
            **cfg.to_dict(),
            "classes": len(run.splits.classes),
            "train_images": len(run.splits.train),
            "valid_images": len(run.splits.valid),
            "frozen_backbone": run.recipe.freeze,
            "feature_cache": run.recipe.caches_features,
            "amp": run.recipe.amp,
            "world_size": run.ctx.world_size,
        }
        name = f"{cfg.arch} {os.path.basename(os.path.abspath(cfg.save_dir))}"
        self.tracker = MlflowTracker.start(params, name, run_id=self.run_id)
        self.run_id = self.tracker.run_id

    def after_epoch(self, trainer: Trainer) -> None:
        if self.tracker is not None:
            self.tracker.log_epoch(trainer.row)

    def after_fit(self, trainer: Trainer) -> None:
        if self.tracker is not None:
            paths = trainer.run.paths
            self.tracker.log_artifacts([paths[BEST], paths[METRICS], paths[CURVES]])
            self.tracker.finish()

    def on_interrupt(self, trainer: Trainer) -> None:
        if self.tracker is not None:
            self.tracker.finish("KILLED")

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        if self.tracker is not None:
            self.tracker.finish("FAILED")

    def state_dict(self) -> dict[str, Any]:
        return {"mlflow_run_id": self.run_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run_id = state.get("mlflow_run_id")
