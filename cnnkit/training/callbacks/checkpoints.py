"""best.pt (the best validation accuracy so far) and last.pt (with what resuming needs), saved
atomically after every epoch; at the end, best.pt gets its drift reference statistics and its
open-set (unknown detection) statistics."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable

from ...drift import reference_statistics
from ...models.checkpoint import Checkpoint, load_checkpoint
from ...models.openset import fit_open_set, fit_open_set_on_features
from ..rundir import BEST, LAST
from .base import Callback

if TYPE_CHECKING:
    from ..loop import Trainer


class Checkpoints(Callback):
    main_only = True

    def after_epoch(self, trainer: Trainer) -> None:
        if trainer.improved:
            trainer.checkpoint(with_state=False).save(trainer.run.paths[BEST])
        trainer.checkpoint(with_state=True).save(trainer.run.paths[LAST])

    def after_fit(self, trainer: Trainer) -> None:
        """Give best.pt (the file to deploy) its validation statistics for drift monitoring and
        its open-set statistics (class means and covariance of the training images' features).

        They take a pass over the validation images and one over the training images with the
        best weights (none when the head trained on a frozen backbone's cached features: the
        statistics reuse them): done once, at the end of the run, rather than at every
        improvement (which would cost cached epochs most of their speed-up).
        """
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
