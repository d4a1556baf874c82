"""Imports run one way: config -> comm -> layers -> models -> parallel/hf -> ... -> cli. Lower packages
never import higher ones, checked on every import statement (module level or inside a function) of
each package's files."""

import ast
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
