"""Model-side protocols and adapters the engine talks to."""
from .base import VelocityModel

__all__ = ["VelocityModel"]
