"""A worker's models, and the changes an operator makes to them without a restart.

:class:`Models` is what a worker serves: the primary, an optional *canary* that answers a share
of the requests, and an optional *shadow* that scores copies of the primary's traffic (see
:mod:`cnnkit.serve.shadow`). It never changes: :class:`Rollout` builds a new one for each
reload, promotion or rollback and swaps the reference between requests, so a request is
decoded, batched and answered by one model from start to end.

A canary's share is drawn per request, or, when the request carries the sticky header
(``--canary-header``), from a stable hash of its value: the same client gets the same model in
every worker and across restarts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
import threading
from typing import Any, Callable, NamedTuple, NoReturn

from ..config import ServeConfig
from ..errors import CnnkitError
from ..models.exported import model_version
from .control import Lineup, publish_lineup, published_lineup, tell_workers
from .model import ServedModel, load_served_model, model_file
from .parsing import HttpError

log = logging.getLogger(__name__)

PRIMARY, CANARY, SHADOW = "primary", "canary", "shadow"
ROLES = (PRIMARY, CANARY, SHADOW)
CANDIDATES = (CANARY, SHADOW)


@dataclasses.dataclass(frozen=True, eq=False)
class Models:
    """The models one worker serves, by role."""

    primary: ServedModel
    canary: ServedModel | None = None
    canary_percent: float = 0.0
    shadow: ServedModel | None = None

    def get(self, role: str) -> ServedModel | None:
        return getattr(self, role)

    def lineup(self) -> Lineup:
        return Lineup(primary=self.primary.path, canary=self.canary.path if self.canary else None,
                      canary_percent=self.canary_percent, shadow=self.shadow.path if self.shadow else None)

    def without(self, role: str) -> "Models":
        """These models less the ``role`` candidate."""
        return dataclasses.replace(self, **{role: None}, **({"canary_percent": 0.0} if role == CANARY else {}))

    def roles(self) -> list[tuple[str, ServedModel]]:
        """``(role, model)`` for each role that has a model."""
        return [(role, model) for role in ROLES if (model := self.get(role)) is not None]


def sticky_share(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big") / 2.0**64


class Route(NamedTuple):
    """Where a request goes: the model that answers it, its role, and the shadow (if any) that
    gets a copy of it, all from one :class:`Models`."""

    model: ServedModel
    role: str
    shadow: ServedModel | None


def route(models: Models, key: str | None, draw: Callable[[], float] = random.random) -> Route:
    """The model that answers a request: the canary for ``canary_percent`` % of requests (of
    sticky keys, when ``key`` is given), else the primary, whose answers the shadow copies."""
    if models.canary is not None:
        share = sticky_share(key) if key else draw()
        if share * 100 < models.canary_percent:
            return Route(models.canary, CANARY, None)
    return Route(models.primary, PRIMARY, models.shadow)


def same_classes(candidate: ServedModel, primary: ServedModel) -> str | None:
    """Why ``candidate`` cannot stand beside or replace ``primary``, or None."""
    if candidate.classes == primary.classes:
        return None
    return (f"its classes differ from the model served ({len(candidate.classes)} vs {len(primary.classes)}, or in "
            "order); a model with other classes is a new service: start another server")


class Rollout:
    """One worker's :class:`Models` and the operator's changes to them: :meth:`reload` (a role's
    file, changed on disk or another one), :meth:`promote` (a candidate becomes the primary),
    :meth:`rollback` (a candidate is dropped) and :meth:`sync` (follow what another worker did).

    A change is checked (the model loads, has the primary's classes, passes a warm-up pass)
    before it is swapped in; a failed one leaves everything as it was. ``on_swap(previous, new)``
    runs after each swap; ``on_reload(result)`` counts reloads, "ok" or "failed".
    """

    def __init__(self, cfg: ServeConfig, models: Models, on_swap: Callable[[Models, Models], None],
                 on_reload: Callable[[str], None]):
        self.cfg = cfg
        self.models = models
        self._on_swap = on_swap
        self._on_reload = on_reload
        self._lock = threading.Lock()

    def _swap(self, new: Models) -> None:
        previous, self.models = self.models, new
        self._on_swap(previous, new)

    def _publish(self, tell: bool) -> bool:
        if not tell:
            return False
        publish_lineup(self.models.lineup())
        return tell_workers()

    def _failed(self, role: str, target: str, reason: str) -> NoReturn:
        self._on_reload("failed")
        message = f"reload of the {role} model {target} failed, still serving {self.models.primary.version}: {reason}"
        log.error("worker %d: %s", os.getpid(), message)
        raise HttpError(422, message, model_version=self.models.primary.version)

    def _load(self, role: str, path: str | None) -> tuple[ServedModel, bool]:
        """The model ``path`` names for ``role`` (default: the role's own file, reread) and whether
        it is new; raises HttpError 422 for a file that cannot be served there."""
        held = self.models.get(role)
        if path is None and held is None:
            raise HttpError(409, f"no {role} model to reload: name one, {{\"checkpoint\": \"<path>\", \"role\": \"{role}\"}}")
        try:
            target = model_file(path) if path else held.path  # type: ignore[union-attr]
            if not os.path.isfile(target):  # (a device such as /dev/zero would be read forever)
                self._failed(role, target, "no such file (give a checkpoint or an exported .onnx or .xml)")
            version = model_version(target)
        except CnnkitError as exc:
            self._failed(role, path or "", str(exc))
        except OSError as exc:
            self._failed(role, path or "", f"cannot read it: {exc.strerror or exc}")
        if held is not None and held.version == version:
            return held, False
        for _, model in self.models.roles():  # promoted or demoted: already loaded and checked
            if model.version == version:
                return dataclasses.replace(model, path=target), True
        try:
            model = load_served_model(self.cfg, target, version=version)
        except CnnkitError as exc:
            self._failed(role, target, str(exc))
        reason = same_classes(model, self.models.primary)
        if reason is not None:
            self._failed(role, target, reason)
        return model, True

    def reload(self, path: str | None = None, role: str = PRIMARY, *, tell: bool = True) -> dict[str, Any]:
        """Load ``path`` (default: the role's file, changed on disk) into ``role`` and swap it in;
        with ``tell``, then have every other worker do the same. HttpError 422 if it cannot serve."""
        with self._lock:
            previous = self.models.get(role)
            model, changed = self._load(role, path)
            if changed:
                percent = self.models.canary_percent or self.cfg.canary_percent
                self._swap(dataclasses.replace(self.models, **{role: model},
                                               canary_percent=percent if role == CANARY else self.models.canary_percent))
                self._on_reload("ok")
                log.info("worker %d: reloaded the %s model %s: %s -> %s", os.getpid(), role, model.path,
                         previous.version if previous else "none", model.version)
            told = self._publish(tell and (path is not None or changed))
        return self._answer("reloaded" if changed else "unchanged", role, model, previous, told)

    def promote(self, role: str = CANARY, *, tell: bool = True) -> dict[str, Any]:
        """The ``role`` candidate becomes the primary (the old primary is dropped)."""
        with self._lock:
            candidate, previous = self._candidate(role), self.models.primary
            self._swap(dataclasses.replace(self.models.without(role), primary=candidate))
            log.info("worker %d: promoted the %s model %s (was %s)", os.getpid(), role, candidate.version, previous.version)
            told = self._publish(tell)
        return self._answer("promoted", PRIMARY, candidate, previous, told)

    def rollback(self, role: str = CANARY, *, tell: bool = True) -> dict[str, Any]:
        """Drop the ``role`` candidate: the primary answers every request again."""
        with self._lock:
            candidate = self._candidate(role)
            self._swap(self.models.without(role))
            log.info("worker %d: rolled back the %s model %s", os.getpid(), role, candidate.version)
            told = self._publish(tell)
        return self._answer("rolled back", role, None, candidate, told)

    def _candidate(self, role: str) -> ServedModel:
        model = self.models.get(role) if role in CANDIDATES else None
        if model is None:
            raise HttpError(409, f"no {role} model is served (start one with --{role} or POST /admin/reload "
                            f'{{"checkpoint": "<path>", "role": "{role}"}})')
        return model

    def _answer(self, status: str, role: str, model: ServedModel | None, previous: ServedModel | None,
                told: bool) -> dict[str, Any]:
        return {
            "status": status,
            "role": role,
            "model_version": self.models.primary.version,
            "role_version": model.version if model else None,
            "previous_version": previous.version if previous else None,
            "model_file": os.path.basename(model.path) if model else None,
            "workers": "all" if told else "this",
            "worker": os.getpid(),
        }

    def sync(self) -> None:
        """Serve what was published (SIGHUP): each role's model, loaded where it changed; a role
        whose model cannot serve keeps the one it has (logged and counted)."""
        lineup = published_lineup() or configured_lineup(self.cfg)
        for role in ROLES:
            path = getattr(lineup, role)
            try:
                if path is None:
                    if self.models.get(role) is not None and role != PRIMARY:
                        self.rollback(role, tell=False)
                else:
                    self.reload(path, role, tell=False)
            except HttpError:
                pass  # logged and counted by _failed
            except Exception:  # a reload never stops a worker
                log.exception("worker %d: reload of the %s model failed", os.getpid(), role)
        if self.models.canary is not None and self.models.canary_percent != lineup.canary_percent:
            with self._lock:
                self._swap(dataclasses.replace(self.models, canary_percent=lineup.canary_percent))


def configured_lineup(cfg: ServeConfig) -> Lineup:
    return Lineup(primary=cfg.checkpoint, canary=cfg.canary, canary_percent=cfg.canary_percent, shadow=cfg.shadow)


def first_models(cfg: ServeConfig) -> Models:
    """What a new worker serves: what a change published (for a worker started after it), else
    the configured models; the configured primary if the published one is gone or broken, and
    no candidate whose file cannot be served (logged)."""
    try:
        published = published_lineup()
    except (OSError, ValueError, TypeError) as exc:
        log.error("worker %d: cannot read the published models (%s); serving the configured ones", os.getpid(), exc)
        published = None
    lineup = published or configured_lineup(cfg)
    try:
        primary = load_served_model(cfg, lineup.primary, check=False)
    except CnnkitError as exc:
        if published is None:
            raise
        log.error("worker %d: cannot load %s, the primary model a reload named (%s); serving %s",
                  os.getpid(), lineup.primary, exc, cfg.checkpoint)
        primary = load_served_model(cfg, cfg.checkpoint, check=False)
    candidates: dict[str, ServedModel | None] = {}
    for role in CANDIDATES:
        path = getattr(lineup, role)
        if path is None:
            continue
        try:
            model = load_served_model(cfg, path, check=False)
            reason = same_classes(model, primary)
            if reason is not None:
                raise CnnkitError(f"{path}: {reason}")
            candidates[role] = model
        except CnnkitError as exc:
            if published is None:
                raise
            log.error("worker %d: cannot load the %s model %s (%s); serving without it", os.getpid(), role, path, exc)
    return Models(primary=primary, canary_percent=lineup.canary_percent if candidates.get(CANARY) else 0.0, **candidates)
