"""The ``Callback`` base class and the lookup of user callbacks named in ``train.callbacks``."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..trainer import Trainer


class Callback:
    """Hooks the trainer calls on every rank, in the order of its callback list.

    A user callback named in ``train.callbacks`` as ``"package.module:Class"`` is a subclass built
    with no arguments; each hook receives the ``Trainer``, whose ``state`` (step, tokens seen, data
    position), ``job``, ``info`` (rank, device) and ``log`` (rank-0 console) it may read. User callbacks
    run after the built-in loggers and before the stop-signal vote and the checkpoint decision of the
    same step. A hook that runs a collective must run on every rank.
    """

    def on_train_start(self, trainer: Trainer) -> None:
        """After setup (model, optimizer, resume, datasets), before the first step of this process."""

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        """After each optimizer step. ``record`` is the step's metrics record; a callback may add keys
        (validation does) that the callbacks after it see."""

    def on_checkpoint_written(self, trainer: Trainer, tmp_dir: str) -> None:
        """Every rank's shards of a checkpoint are in ``tmp_dir``; it is not yet renamed into place. With
        ``checkpoint.async_save`` this runs when the background write is committed, possibly steps after
        the save began: read the checkpoint's step with ``training.checkpoint.checkpoint_step(tmp_dir)``,
        not ``trainer.state.step``."""

    def on_train_end(self, trainer: Trainer, summary: dict) -> None:
        """After the last step (or a stop on a signal); ``summary`` becomes ``summary.json``."""

    def close(self, trainer: Trainer) -> None:
        """Last, also when training raised: release what ``on_train_start`` acquired."""


def resolve_callback(spec: object) -> type[Callback]:
    """The ``Callback`` subclass named by ``"package.module:Class"``; ValueError saying what is wrong."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"expected 'package.module:Class', got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any failure to import it is a bad entry, reported with the config's key
        raise ValueError(f"cannot import module {module_name!r} ({type(err).__name__}: {err})") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise ValueError(f"{spec} is not a subclass of gptforge.training.callbacks.Callback")
    return cls
