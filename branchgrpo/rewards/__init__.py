"""Reward models: one interface, ``reward(images, prompts) -> scores``."""
from .base import Reward

__all__ = ["Reward"]
