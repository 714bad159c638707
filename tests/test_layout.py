"""The package's layers: the core stays light, lower layers never import higher ones, and the
README's library example runs as written."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import barlowtwins

_PACKAGE = Path(barlowtwins.__file__).parent
_README = Path(__file__).parents[1] / "README.md"
# Lowest first; the core is every module directly in the package.
_LAYERS = ("core", "nn", "views", "data", "training", "evaluation", "app")
# What the core may use: nn/ and views/ are torch-only building blocks of the core too.
_CORE_LAYERS = {"core", "nn", "views"}
# Public names the package root imports only when asked for (they need Lightning).
_LAZY = {"BarlowTwinsModule", "load_pretrained"}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in _LAYERS else "core"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("barlowtwins.")}


def test_importing_the_core_loads_no_lightning_matplotlib_or_sklearn() -> None:
    code = (
        "import sys, barlowtwins, barlowtwins.views, barlowtwins.nn.distributed, "
        "barlowtwins.precision\n"
        "from barlowtwins import "
        + ", ".join(n for n in barlowtwins.__all__ if n not in _LAZY)
        + "\n"
        "heavy = {'lightning', 'matplotlib', 'sklearn'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_no_module_imports_a_higher_layer() -> None:
    offences = []
    for path in sorted(_PACKAGE.rglob("*.py")):
        module = ".".join(("barlowtwins", *path.relative_to(_PACKAGE).with_suffix("").parts))
        own = _LAYERS.index(_layer(module))
        for imported in sorted(_imports(path)):
            if _LAYERS.index(_layer(imported)) > own and not (
                _layer(module) in _CORE_LAYERS and _layer(imported) in _CORE_LAYERS
            ):
                offences.append(f"{module} imports {imported}")
    # The package root exposes BarlowTwinsModule lazily (a function-level import), and
    # ``python -m barlowtwins`` is the command line.
    assert offences == [
        "barlowtwins.__init__ imports barlowtwins.app.runs",
        "barlowtwins.__init__ imports barlowtwins.training.module",
        "barlowtwins.__main__ imports barlowtwins.app.cli",
    ]


def test_every_public_name_imports() -> None:
    for name in barlowtwins.__all__:
        assert getattr(barlowtwins, name) is not None


def test_the_readme_library_example_runs() -> None:
    block = re.search(
        r"<!-- library-start -->\s*```python\n(.*?)```", _README.read_text(), re.DOTALL
    )
    assert block is not None
    exec(compile(block.group(1), "README.md", "exec"), {})
