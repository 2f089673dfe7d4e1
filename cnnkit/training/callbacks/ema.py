"""``--ema DECAY``: an exponential moving average of the weights, validated and saved in
``best.pt`` instead of the raw weights (timm's ModelEmaV3 and torchvision's recipe do the same).

torch.optim.swa_utils' AveragedModel keeps the average, BatchNorm's running statistics included
(``use_buffers``: the averaged model's statistics are the average of the trained model's, so it
needs no extra pass over the data); it is updated after every optimizer step. ``last.pt`` keeps
the raw weights, to go on training from, and the average in its training state, so a resumed
run continues the same average.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ...models.build import head_module
from .base import Callback

if TYPE_CHECKING:
    from ..loop import Trainer


class ModelEma(Callback):
    def __init__(self, decay: float):
        self.decay = decay
        self.average: AveragedModel | None = None
        self._saved: dict[str, Any] | None = None

    def before_fit(self, trainer: Trainer) -> None:
        self.average = AveragedModel(trainer.run.model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        if self._saved is not None:
            self.average.load_state_dict(self._saved)
        self.average.eval()
        trainer.deployed_weights = self.average.module.state_dict

    def before_phase(self, trainer: Trainer) -> None:
        """Validate the average: the whole model, or its head on a cached head phase's features."""
        model = self.average.module
        trainer.validated = head_module(model, trainer.cfg.arch) if trainer.net is trainer.run.head else model

    def after_step(self, trainer: Trainer) -> None:
        self.average.update_parameters(trainer.run.model)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": {k: v.detach().cpu() for k, v in self.average.state_dict().items()}} if self.average else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._saved = state.get("ema")
