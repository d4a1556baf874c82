"""Parallelism applied to a built single-device model (`parallelize`)."""

from pyramoe.parallel.expert import AllToAllDispatcher
from pyramoe.parallel.parallelize import ParallelState, parallelize

__all__ = ["AllToAllDispatcher", "ParallelState", "parallelize"]
