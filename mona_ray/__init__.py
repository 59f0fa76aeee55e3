"""mona_ray: task-specific data selection with monosemantic SAE activations (MoNA) on Ray Data.

``python -m mona_ray.run`` is the command line; :func:`mona_ray.select` the same job from Python."""

from .api import Selection, select

__all__ = ["Selection", "select"]
