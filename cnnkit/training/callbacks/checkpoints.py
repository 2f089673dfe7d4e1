"""best.pt (the best validation accuracy so far) and last.pt (with what resuming needs), saved
atomically after every epoch, on a background thread while the next epoch trains; at the end,
best.pt gets its drift reference statistics and its open-set (unknown detection) statistics."""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterable

from ...drift import reference_statistics
from ...models.checkpoint import Checkpoint, load_checkpoint
from ...models.openset import fit_open_set, fit_open_set_on_features
from ..rundir import BEST, LAST
from .base import Callback

if TYPE_CHECKING:
    from ..loop import Trainer

log = logging.getLogger(__name__)


class BackgroundWrites:
    """Checkpoint writes on one background thread, in the order submitted (Lightning's
    AsyncCheckpointIO): the next epoch trains while this epoch's files are written. Inline, the
    writes (serialising, hashing and syncing last.pt's weights and optimizer state after every
    one-second epoch) took a fifth of a 30-epoch README demo's profile; in the background the
    demo runs in about 0.9 times its time (benchmarks/RESULTS.md)."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def submit(self, checkpoint: Checkpoint, path: str) -> None:
        """Write ``checkpoint``, which must own its tensors (:meth:`Checkpoint.detached`), to ``path``."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnkit-checkpoint")
        self._pending.append(self._executor.submit(checkpoint.save, path))

    def wait(self) -> None:
        """Return once every submitted write has ended; raise the first one's error. A write stays
        pending until it has ended, so an interrupted wait can be waited for again."""
        error = None
        while self._pending:
            try:
                self._pending[0].result()
            except Exception as exc:  # (OutputError for a full disk): the later writes still end
                error = error or exc
            self._pending.pop(0)
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for the writes, then end the thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown()
                self._executor = None


class Checkpoints(Callback):
    main_only = True

    def __init__(self) -> None:
        self.writes = BackgroundWrites()

    def before_phase(self, trainer: Trainer) -> None:
        # The new phase's loaders fork their worker processes next: not while a thread is writing.
        self.writes.wait()

    def after_epoch(self, trainer: Trainer) -> None:
        self.writes.wait()  # the previous epoch's files are complete (or their error is raised)
        if trainer.improved:
            self.writes.submit(trainer.checkpoint(with_state=False).detached(), trainer.run.paths[BEST])
        self.writes.submit(trainer.checkpoint(with_state=True).detached(), trainer.run.paths[LAST])

    def on_interrupt(self, trainer: Trainer) -> None:
        self.writes.close()  # last.pt holds the last finished epoch, as the stop message says

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        try:
            self.writes.close()
        except Exception as exc:  # the run's own error is the one to report
            log.warning("%s", exc)

    def after_fit(self, trainer: Trainer) -> None:
        """Give best.pt (the file to deploy) its validation statistics for drift monitoring and
        its open-set statistics (class means and covariance of the training images' features).

        They take a pass over the validation images and one over the training images with the
        best weights (none when the head trained on a frozen backbone's cached features: the
        statistics reuse them): done once, at the end of the run, rather than at every
        improvement (which would cost cached epochs most of their speed-up).
        """
        self.writes.close()
        path, run = trainer.run.paths[BEST], trainer.run
        if not os.path.exists(path):
            return
        best = load_checkpoint(path)
        if best.reference_stats is not None and best.open_set is not None:
            return
        model = run.model
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best.state_dict)
        try:
            # The epochs' own validation loader when it is unsharded images; else the whole set.
            loader = trainer.valid_loader if not run.ctx.enabled and trainer.net is model else run.loaders.whole_validation()
            if best.reference_stats is None:
                best.reference_stats = reference_statistics(model, loader, trainer.device)
            if best.open_set is None:
                best.open_set = self._open_set(trainer, best, loader)
        finally:
            model.load_state_dict(current)
        best.save(path)

    @staticmethod
    def _open_set(trainer: Trainer, best: Checkpoint, valid_loader: Iterable) -> dict[str, Any] | None:
        """best.pt's open-set statistics: from the frozen backbone's cached features when the run
        ended on them (they are the head's inputs for the same images), else from the images."""
        run, classes = trainer.run, len(best.classes)
        cached = run.loaders.features
        if "train" in cached and "valid" in cached:
            train, valid = cached["train"], cached["valid"]
            return fit_open_set_on_features(run.head, train.features, train.targets, valid.features, classes,
                                            trainer.device)
        return fit_open_set(run.model, best.arch, run.loaders.whole_train(), valid_loader, classes, trainer.device)
