"""Checkpoints: safe loading of every supported format, name mapping, atomic saving."""

from .checkpointer import Checkpointer

__all__ = ["Checkpointer"]
