"""Imports run one way: config -> comm -> layers -> models -> parallel/hf -> ... -> cli. Lower packages
never import higher ones, checked on every import statement (module level or inside a function) of
each package's files."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyramoe"

# What each lower package may import from pyramoe (itself included).
ALLOWED = {
    "config": {"config"},
    "comm": {"config", "comm"},
    "kernels": {"kernels"},  # native CPU kernels: torch only
    "layers": {"config", "kernels", "layers"},  # single-device: never comm
    "models": {"config", "layers", "models"},
    "parallel": {"config", "comm", "layers", "models", "parallel"},
    "hf": {"config", "layers", "models", "hf"},  # beside parallel: checkpoints in/out, single-device
    # Reading checkpoints (the format, building a model from one): below both training and inference.
    "checkpoint": {"config", "layers", "models", "parallel", "checkpoint"},
    # Training and inference are siblings: training writes checkpoints, the engine reads them through
    # `checkpoint`, never through the trainer.
    "train": {"config", "comm", "layers", "models", "parallel", "presets", "data", "checkpoint", "train"},
    "inference": {
        "config", "runtime", "kernels", "layers", "models", "parallel", "hf", "data", "checkpoint", "inference"
    },
    "evaluation": {"config", "runtime", "tables", "models", "hf", "data", "checkpoint", "inference", "evaluation"},
    # The HTTP layer: over the engine (and the torchrun launch helpers), never the trainer.
    "serve": {"data", "inference", "parallel", "serve"},
}


def pyramoe_imports(path: Path) -> set[str]:
    """Top-level pyramoe subpackages/modules that `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            if node.module != "pyramoe":
                names = names[:1]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "pyramoe" and len(parts) > 1:
                found.add(parts[1])
    return found


def files_of(package: str) -> list[Path]:
    single = PACKAGE / f"{package}.py"
    return [single] if single.exists() else sorted((PACKAGE / package).glob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_lower_layers(package):
    files = files_of(package)
    assert files, package
    for path in files:
        bad = pyramoe_imports(path) - ALLOWED[package]
        assert not bad, f"{path.relative_to(PACKAGE)} imports pyramoe.{sorted(bad)[0]}"


def test_checker_sees_function_level_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from pyramoe.train import trainer\n    import pyramoe.cli.main\n")
    assert pyramoe_imports(sample) == {"train", "cli"}


def module_imports(path: Path) -> set[str]:
    """Dotted pyramoe modules that `path` imports (`from pyramoe.a import b` counts pyramoe.a.b when
    that is a module, else pyramoe.a), at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pyramoe."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pyramoe."):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if _module_file(child) is not None else node.module)
    return found


def _module_file(dotted: str) -> Path | None:
    base = PACKAGE.parent.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_cycle(package: str) -> list[str] | None:
    """A cycle among the modules of pyramoe.PACKAGE, or None."""
    modules = {f"pyramoe.{package}.{p.stem}": p for p in (PACKAGE / package).glob("*.py") if p.stem != "__init__"}
    edges = {name: module_imports(path) & set(modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for target in sorted(edges[name]):
            if state.get(target) == 1:
                return [*path, name, target]
            if target not in state and (cycle := visit(target, path + [name])):
                return cycle
        state[name] = 2
        return None

    for name in sorted(modules):
        if name not in state and (cycle := visit(name, [])):
            return cycle
    return None


@pytest.mark.parametrize("package", ["bench", "comm", "parallel", "train"])
def test_modules_of_a_package_do_not_import_each_other_in_a_cycle(package):
    assert import_cycle(package) is None


def test_cycle_finder_finds_one(tmp_path, monkeypatch):
    pkg = tmp_path / "pyramoe" / "loop"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("from pyramoe.loop.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pyramoe.loop import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "pyramoe")
    assert import_cycle("loop") is not None
