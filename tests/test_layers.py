"""The packages import downward only: toolchain < calib < export < engines (command-line modules aside),
and no two library modules import each other.

Every import statement counts, the ones inside functions too (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("toolchain", "calib", "export", "engines")


def is_cli(module: str) -> bool:
    """Command-line modules wire every layer together; they may import from any of them."""
    parts = module.split(".")
    return "cli" in parts or parts[-1] == "cli" or parts[-1].startswith("cli_")


def modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The 2dq modules ``module`` imports (absolute and relative, at any depth of the file)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            target = ".".join(part for part in (base, node.module or "") if part)
            targets = [target] + [f"{target}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != module:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imports(module, path, known) for module, path in known.items()}


def test_the_walk_sees_the_tree():
    """The walk finds modules of every layer and their imports (so the checks below can fail)."""
    edges = graph()
    assert {module.split(".")[0] for module in edges} == set(LAYERS)
    assert "toolchain.quant.grid" in edges["calib.dobi"]
    assert "engines.ort_engine" in edges["engines.upscalers"]          # a lazy import inside a function
    assert "calib.transforms" in edges["calib.artifact"] or any(
        target.startswith("calib.transforms") for target in edges["calib.artifact"])  # a relative import


def test_layers_import_downward():
    rank = {name: k for k, name in enumerate(LAYERS)}
    upward = sorted(f"{module} -> {target}" for module, targets in graph().items() if not is_cli(module)
                    for target in targets if rank[target.split(".")[0]] > rank[module.split(".")[0]])
    assert upward == [], "library modules importing a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules():
    """Package ``__init__`` files re-export their modules and are left out; any other cycle is a defect."""
    known = modules()
    edges = {module: {t for t in targets if known[t].name != "__init__.py"}
             for module, targets in graph().items() if known[module].name != "__init__.py"}
    cycles = []
    for start in edges:
        stack, seen = [(start, (start,))], set()
        while stack:
            module, path = stack.pop()
            for target in edges[module]:
                if target == start:
                    cycles.append(" -> ".join(path + (start,)))
                elif target not in seen and target > start:  # report each cycle once, from its smallest module
                    seen.add(target)
                    stack.append((target, path + (target,)))
    assert cycles == [], "modules importing each other:\n" + "\n".join(cycles)


@pytest.mark.parametrize("module, expected", [("toolchain.cli.eval", True), ("engines.cli_build", True),
                                              ("calib.report.cli", True), ("calib.dqc", False),
                                              ("engines.upscalers", False)])
def test_cli_modules_are_named_so(module, expected):
    assert is_cli(module) is expected
