"""Training: build a run (factory), loop over it (loop), announce events to subscribers (events).

Add a logger by writing a `Subscriber` (events.py) and passing it to `train(subscribers=[...])`;
the `--log` loggers (TensorBoard, W&B) are subscribers too, in loggers/.
"""

from .events import (Evaluated, Finished, Logged, Notice, Saved, Started, Stepped, Subscriber,
                     TrainResult)
from . import factory  # noqa: F401  (training.factory.build, for scripts)
from .loop import Trainer, train
from .optim import lr_factor

__all__ = ["train", "Trainer", "TrainResult", "Subscriber", "Started", "Stepped", "Evaluated", "Logged",
           "Saved", "Notice", "Finished", "lr_factor"]
