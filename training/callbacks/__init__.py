"""Training callbacks: what happens around the optimizer steps of ``training/trainer.py``.

Only the base class is imported here: ``training/config.py`` checks ``train.callbacks`` entries against
it while a config loads, before anything heavy (MLflow, plotting) should be imported.
"""

from .base import Callback, resolve_callback

__all__ = ["Callback", "resolve_callback"]
