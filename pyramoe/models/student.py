"""Mixture-of-Students: a shallower student built from a teacher's config, and its initialisation
from the teacher's weights.

Which blocks a student keeps: the teacher's first and last blocks always (the first reads the
embeddings, the last feeds the output head, and PR-MoE puts its largest expert counts at the end),
and `n_teacher - n_student` evenly spaced middle blocks are dropped. Every kept block keeps its own
FFN - dense, MoE with its expert count, Residual-MoE - so the student's MoE/dense pattern and
pyramid are the teacher's with the dropped blocks left out, and each student block has exactly the
shapes of the teacher block it comes from. Examples: 4 -> 3 keeps blocks [0, 1, 3];
24 -> 21 (12.5% fewer) drops blocks 4, 12 and 19.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pyramoe.config import ModelConfig

LayerMap = list[int | None]  # student block i comes from teacher block layer_map[i] (None: from nowhere)


def student_layer_ids(n_teacher: int, n_student: int) -> list[int]:
    """The teacher blocks a student of `n_student` blocks keeps, in order."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"distill.student_layers: must be in [1, {n_teacher}] (the teacher's depth), got {n_student}")
    n_drop = n_teacher - n_student
    if n_drop == 0:
        return list(range(n_teacher))
    if n_student < 2:
        raise ValueError(
            f"distill.student_layers: a student keeps the teacher's first and last blocks, so it needs at least 2 "
            f"(got {n_student}; also check distill.layer_fraction)"
        )
    middle = n_teacher - 2
    # Centres of n_drop equal slices of the middle blocks: spaced >= 1 apart, so all distinct.
    dropped = {1 + int((i + 0.5) * middle / n_drop) for i in range(n_drop)}
    return [i for i in range(n_teacher) if i not in dropped]


def student_depth(n_teacher: int, n_layers: int | None = None, layer_fraction: float = 0.875) -> int:
    """`n_layers`, or the teacher's depth times `layer_fraction` rounded down (at least 1): a student
    is never deeper than asked, and 0.875 of 4 blocks is 3."""
    if n_layers is not None:
        return n_layers
    if not 0 < layer_fraction <= 1:
        raise ValueError(f"distill.layer_fraction: must be in (0, 1], got {layer_fraction}")
    return max(1, math.floor(layer_fraction * n_teacher + 1e-9))  # 1e-9: 0.875 * 24 is 21, not 20.99...


def student_config(
    teacher: ModelConfig, n_layers: int | None = None, layer_fraction: float = 0.875
) -> tuple[ModelConfig, list[int]]:
    """The teacher's config with blocks dropped (see the module docstring), and the kept blocks' ids."""
    keep = student_layer_ids(teacher.n_layers, student_depth(teacher.n_layers, n_layers, layer_fraction))
    data = teacher.to_dict()
    data["layers"] = [data["layers"][i] for i in keep]
    return ModelConfig.from_dict(data), keep


def default_layer_map(n_teacher: int, n_student: int) -> LayerMap:
    """A layer map for a student of any depth: the kept-block rule when it is shallower, block i from
    block i otherwise (blocks past the teacher's depth come from nowhere)."""
    if n_student >= n_teacher:
        return [i if i < n_teacher else None for i in range(n_student)]
    if n_student == 1:
        return [0]
    return list(student_layer_ids(n_teacher, n_student))


def init_student_from_teacher(
    student: nn.Module, teacher: nn.Module, layer_map: LayerMap, strict: bool = True
) -> list[str]:
    """Copy the teacher's weights into the student: embeddings, final LayerNorm, output head and, for
    each student block i, every tensor of teacher block layer_map[i].

    strict: every student tensor must have a teacher counterpart of the same shape (a ValueError names
    the first that does not) - for a student derived with `student_config`. Otherwise tensors without
    one are left as initialised (a student built from another preset). Returns the copied names.
    """
    n_blocks = len(getattr(student, "blocks", []))
    if len(layer_map) != n_blocks:
        raise ValueError(f"layer map has {len(layer_map)} entries for a student of {n_blocks} blocks")
    source = teacher.state_dict()
    copied = []
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            teacher_name = _teacher_name(name, layer_map)
            problem = _mismatch(tensor, source.get(teacher_name) if teacher_name else None, teacher_name)
            if problem:
                if strict:
                    raise ValueError(f"cannot initialise the student from the teacher: {name}: {problem} "
                                     "(set distill.init_from_teacher=false to start from random weights)")
                continue
            tensor.copy_(source[teacher_name])
            copied.append(name)
    return copied


def _teacher_name(name: str, layer_map: LayerMap) -> str | None:
    """blocks.{i}.rest -> blocks.{layer_map[i]}.rest; non-block names are the same in both models."""
    if not name.startswith("blocks."):
        return name
    _, index, rest = name.split(".", 2)
    source = layer_map[int(index)]
    return None if source is None else f"blocks.{source}.{rest}"


def _mismatch(tensor: torch.Tensor, source: torch.Tensor | None, teacher_name: str | None) -> str | None:
    if teacher_name is None:
        return "no teacher block maps to it"
    if source is None:
        return f"the teacher has no {teacher_name}"
    if source.shape != tensor.shape:
        return f"shape {tuple(tensor.shape)} in the student, {tuple(source.shape)} in the teacher ({teacher_name})"
    return None
