"""Parallelism applied to a built single-device model (`parallelize`)."""

from pyramoe.parallel.expert import AllToAllDispatcher, source_major_to_expert_major
from pyramoe.parallel.parallelize import ParallelState, parallelize

__all__ = ["AllToAllDispatcher", "ParallelState", "parallelize", "source_major_to_expert_major"]
