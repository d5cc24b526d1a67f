"""The house's layers (doc/ARCHITECTURE.md): a module imports only from its own package or from lower layers.

Every import in product code is checked, including those inside functions, so a lazy import cannot hide an upward
edge. Packages on the same layer (data, optimizer, utils.sd) do not import each other.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> layer; lower numbers are lower layers
LAYERS = {
    "utils.core": 0,
    "data": 1, "optimizer": 1, "utils.sd": 1,
    "utils.eval": 2,
    "utils.run": 3,
    "utils.perf": 4,
    "entry": 5,      # train.py and the `python -m utils.benchmark / utils.convert_ldm` entry points
}
PRODUCT_DIRS = ("utils", "data", "optimizer")
MAX_LINES = 500


def package_of(module: str) -> str | None:
    """The layered package a dotted module name belongs to, or None for third-party modules."""
    parts = module.split(".")
    if parts[0] in ("data", "optimizer"):
        return parts[0]
    if parts[0] == "utils" and len(parts) > 1 and f"utils.{parts[1]}" in LAYERS:
        return f"utils.{parts[1]}"
    if parts[0] in ("utils", "train"):
        return "entry"
    return None


def product_files() -> list[Path]:
    files = [ROOT / "train.py"]
    for folder in PRODUCT_DIRS:
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def module_name(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from utils.sd import models" names the module utils.sd.models
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def upward_imports(files: list[Path], root: Path = ROOT) -> list[str]:
    problems = []
    for path in files:
        here = package_of(module_name(path, root))
        for line, target in imported_modules(path):
            there = package_of(target)
            if there is None or there == here:
                continue
            if LAYERS[there] >= LAYERS[here]:
                problems.append(f"{path.relative_to(root)}:{line} ({here}, layer {LAYERS[here]}) imports {target} "
                                f"({there}, layer {LAYERS[there]})")
    return problems


def test_every_product_module_belongs_to_a_layer():
    stray = [str(p.relative_to(ROOT)) for p in product_files()
             if package_of(module_name(p)) == "entry" and p.parent.name == "utils" and p.name not in
             ("__init__.py", "benchmark.py", "convert_ldm.py")]
    assert not stray, f"modules outside the layered packages (put them in utils/core, sd, eval, run or perf): {stray}"


def test_imports_only_go_down():
    assert not upward_imports(product_files()), "\n".join(upward_imports(product_files()))


def test_the_check_sees_an_upward_import(tmp_path):
    """The check itself: a core module importing the loop is reported (so an empty result means something)."""
    fake = tmp_path / "utils" / "core" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from utils.run import trainer\n")
    assert upward_imports([fake], tmp_path) == ["utils/core/bad.py:2 (utils.core, layer 0) imports utils.run.trainer "
                                      "(utils.run, layer 3)"]


@pytest.mark.parametrize("path", product_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_product_files_stay_short(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it (at most {MAX_LINES})"
