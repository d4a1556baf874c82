"""Checks that every torch.distributed collective gets tensors on the run's device (NCCL takes no
CPU tensor), made to fail on a CPU-only machine where every tensor is on the CPU anyway:

- `host_born_collectives`: a static pass over the package's source. A tensor is host-born when a
  constructor (torch.tensor, zeros, ...) made it without `device=`, or `.cpu()` moved it there, or
  it is computed from host-born tensors only; a collective argument (or one of a function passing
  its parameter on to a collective, transitively, autograd Functions included) must not be.
- `HostBornTaint`: the same rule at run time, a TorchFunctionMode that marks host-born tensors as
  they are made and computed, with every collective wrapped to refuse a marked one.
"""

from __future__ import annotations

import ast
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single", "broadcast",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "send", "recv", "isend", "irecv",
}
CONSTRUCTORS = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "randint"}
LIKE = {"zeros_like", "ones_like", "empty_like", "full_like"}
NOT_TENSORS = {"group", "op", "src", "dst", "async_op", "tag", "input_split_sizes", "output_split_sizes"}


# -- static ----------------------------------------------------------------------------------------------------


def _root(node: ast.AST) -> ast.AST:
    """The start of a chain a.b(...).c[...]: the name or call it begins with."""
    while True:
        if isinstance(node, ast.Attribute | ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not _is_torch_call(node):
            node = node.func.value
        else:
            return node


def _is_torch_call(node: ast.Call) -> bool:
    f = node.func
    return isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "torch"


def _methods_in_chain(node: ast.AST) -> Iterator[str]:
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Call):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node.func.attr
            node = node.func.value
        else:
            node = node.value if not isinstance(node, ast.Call) else node.func


def _host_born(node: ast.AST, host: set[str]) -> bool:
    methods = list(_methods_in_chain(node))  # outermost call first
    for method in methods:
        if method == "cpu":
            return True
        if method in ("to", "cuda"):
            return False  # moved to a device the caller gives
    if isinstance(node, ast.BinOp):
        sides = [s for s in (node.left, node.right) if not isinstance(s, ast.Constant)]
        return bool(sides) and all(_host_born(s, host) for s in sides)
    root = _root(node)
    if isinstance(root, ast.Name):
        return root.id in host
    if isinstance(root, ast.Call) and _is_torch_call(root):
        name = root.func.attr
        has_device = any(k.arg == "device" for k in root.keywords)
        if name in CONSTRUCTORS:
            return not has_device
        if name in LIKE and root.args:
            return not has_device and _host_born(root.args[0], host)
        return bool(root.args) and all(_host_born(a, host) for a in root.args if not isinstance(a, ast.Constant))
    return False


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            yield node


def _host_names(fn: ast.FunctionDef) -> set[str]:
    host: set[str] = set()
    for _ in range(3):  # a few passes: names defined from names defined later in the walk order
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                if _host_born(node.value, host):
                    host.add(node.targets[0].id)
    return host


def _callee(call: ast.Call) -> tuple[str, int] | None:
    """(name, offset of the first argument) of a call that may be a sink: dist.X / torch.distributed.X,
    a plain function, or an autograd Function's Cls.apply (its forward's first parameter is ctx)."""
    f = call.func
    if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES:
        base = f.value
        if (isinstance(base, ast.Name) and base.id == "dist") or (
            isinstance(base, ast.Attribute) and base.attr == "distributed"
        ):
            return f"dist.{f.attr}", 0
    if isinstance(f, ast.Name):
        return f.id, 0
    if isinstance(f, ast.Attribute) and f.attr == "apply" and isinstance(f.value, ast.Name):
        return f"{f.value.id}.forward", 1
    return None


def _arguments(call: ast.Call) -> Iterator[tuple[int | str, ast.AST]]:
    yield from enumerate(call.args)
    for k in call.keywords:
        if k.arg is not None and k.arg not in NOT_TENSORS:
            yield k.arg, k.value


def _is_sink(name: str, position: int | str, sinks: dict[str, set[int | str]]) -> bool:
    return name.startswith("dist.") or position in sinks.get(name, set())


def host_born_collectives(files: list[Path]) -> list[str]:
    """`file:line: collective(...) gets host-born NAME` for every violation."""
    trees = {path: ast.parse(path.read_text(encoding="utf-8")) for path in files}
    sinks: dict[str, set[int | str]] = {}  # function -> parameter positions/names reaching a collective
    changed = True
    while changed:
        changed = False
        for tree in trees.values():
            for fn, owner in _functions_with_owner(tree):
                params = [a.arg for a in fn.args.args]
                key = f"{owner}.{fn.name}" if owner else fn.name
                for _, _, arg in _sink_arguments(fn, sinks):
                    root = _root(arg)
                    if isinstance(root, ast.Name) and root.id in params:
                        new = {params.index(root.id), root.id}
                        if not new <= sinks.setdefault(key, set()):
                            sinks[key] |= new
                            changed = True
    problems = []
    for path, tree in trees.items():
        for fn, _ in _functions_with_owner(tree):
            host = _host_names(fn)
            for call, name, arg in _sink_arguments(fn, sinks):
                if _host_born(arg, host):
                    problems.append(f"{path.name}:{call.lineno}: {name}(...) gets host-born {ast.unparse(arg)}")
    return problems


def _sink_arguments(fn: ast.AST, sinks: dict[str, set[int | str]]):  # noqa: ANN202
    """(call, callee name, argument) for every argument of `fn`'s calls that reaches a collective."""
    for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
        callee = _callee(call)
        if callee is None:
            continue
        name, offset = callee
        for position, arg in _arguments(call):
            target = position + offset if isinstance(position, int) else position
            if _is_sink(name, target, sinks):
                yield call, name, arg


def _functions_with_owner(tree: ast.AST) -> Iterator[tuple[ast.FunctionDef, str | None]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    yield item, node.name
    for node in tree.body if isinstance(tree, ast.Module) else []:
        if isinstance(node, ast.FunctionDef):
            for fn in _functions(node):
                yield fn, None


# -- at run time -----------------------------------------------------------------------------------------------

WRAPPED = ("all_reduce", "all_gather", "all_to_all_single", "broadcast", "reduce_scatter_tensor",
           "all_gather_into_tensor")
_FACTORIES = {getattr(torch, n) for n in CONSTRUCTORS} | {getattr(torch, n) for n in LIKE}


class HostBornTaint(TorchFunctionMode):
    """Marks tensors made without `device=` (or by `.cpu()`), and results computed from marked tensors
    only; `install_collective_guard` then refuses marked tensors in collectives."""

    def __init__(self) -> None:
        super().__init__()
        # id -> weak reference: a WeakSet would compare two live tensors with == (elementwise).
        self.marked: dict[int, weakref.ref] = {}
        self.seen = 0  # collective calls checked

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES:
            like = args[0] if func in {getattr(torch, n) for n in LIKE} and args else None
            host = "device" not in kwargs and (like is None or self._is_marked(like))
        elif func is torch.Tensor.cpu:
            host = True
        elif func in (torch.Tensor.to, torch.Tensor.cuda):
            host = self._is_marked(args[0]) and len(args) == 1 and "device" not in kwargs
            if not host and isinstance(out, torch.Tensor):
                self.marked.pop(id(out), None)  # `.to(device)` of a tensor already there returns it
        else:
            inputs = list(_tensors(args, kwargs))
            host = bool(inputs) and all(self._is_marked(t) for t in inputs)
        if host:
            for t in _tensors((out,), {}):
                self._mark(t)
        return out

    def _mark(self, t: torch.Tensor) -> None:
        key = id(t)

        def forget(ref: weakref.ref, marked: dict = self.marked) -> None:
            if marked.get(key) is ref:
                del marked[key]

        self.marked[key] = weakref.ref(t, forget)

    def _is_marked(self, t: object) -> bool:
        ref = self.marked.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t


def _tensors(args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, list | tuple):
            yield from (v for v in value if isinstance(v, torch.Tensor))


def install_collective_guard(taint: HostBornTaint) -> None:
    """Wrap torch.distributed's tensor collectives to raise on a host-born tensor."""
    for name in WRAPPED:
        real = getattr(dist, name)

        def guarded(*args, _real=real, _name=name, **kwargs):  # noqa: ANN002, ANN003, ANN202
            taint.seen += 1
            for t in _tensors(args, kwargs):
                if taint._is_marked(t):
                    raise AssertionError(f"dist.{_name} got a host-born tensor {tuple(t.shape)}: create it on "
                                         f"the run's device")
            return _real(*args, **kwargs)

        setattr(dist, name, guarded)
