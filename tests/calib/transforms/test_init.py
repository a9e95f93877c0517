"""The transforms package (calib/transforms/__init__.py): what it may import, and its public names."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import calib.transforms

PACKAGE = Path(calib.transforms.__file__).parent
#: top-level packages the transforms may import besides the standard library
ALLOWED = {"torch", "toolchain", "calib"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                roots.add(node.module.split(".")[0])
            elif node.level > 1:  # ..x: a sibling of the package inside calib
                roots.add("calib")
    return roots


def test_the_package_imports_toolchain_and_calib_only():
    modules = sorted(PACKAGE.glob("*.py"))
    assert {p.stem for p in modules} >= {"__init__", "fold", "trace", "smoothing", "shift", "input_shift",
                                         "registry", "pipeline"}
    for path in modules:
        foreign = _imported_roots(path) - ALLOWED - set(sys.stdlib_module_names) - {"__future__"}
        assert not foreign, f"{path.name} imports {sorted(foreign)}"


def test_every_public_name_is_exported():
    assert all(hasattr(calib.transforms, name) for name in calib.transforms.__all__)
    assert len(set(calib.transforms.__all__)) == len(calib.transforms.__all__)
    for module in (calib.transforms.smoothing, calib.transforms.shift, calib.transforms.input_shift,
                   calib.transforms.registry, calib.transforms.pipeline):
        public = {name for name, value in vars(module).items() if callable(value) and not name.startswith("_")
                  and getattr(value, "__module__", None) == module.__name__}
        missing = public - set(calib.transforms.__all__)
        assert not missing, f"{module.__name__}: {sorted(missing)}"
