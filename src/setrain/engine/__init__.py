"""The training engine: the loop and evaluation (loop.py), checkpoints, and the run (trainer.py)."""

from setrain.engine.trainer import train

__all__ = ["train"]
