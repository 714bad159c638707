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
_DEVELOPMENT = Path(__file__).parents[1] / "docs" / "development.md"
# The order the imports really have, lowest first: the torch-only core (modules directly in the
# package) builds on nn/ and views/; runs/ reads what training writes without Lightning;
# evaluation/ scores features; training/ is the Lightning layer (it scores with evaluation's
# kNN); app/ is the command line on top.
_LAYERS = ("nn", "views", "core", "data", "runs", "evaluation", "training", "app")
# Public names the package root imports only when asked for (they need Lightning).
_LAZY = {"BarlowTwinsModule", "load_pretrained"}


def _layer(module: str) -> str:
    """The layer of a module; ``barlowtwins.evaluation`` (an import through the package's
    ``__init__``) counts as the package it names."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in _LAYERS else "core"


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
            if _LAYERS.index(_layer(imported)) > own:
                offences.append(f"{module} imports {imported}")
    # The package root exposes BarlowTwinsModule and load_pretrained lazily (function-level
    # imports), and ``python -m barlowtwins`` is the command line.
    assert offences == [
        "barlowtwins.__init__ imports barlowtwins.runs.loader",
        "barlowtwins.__init__ imports barlowtwins.training.module",
        "barlowtwins.__main__ imports barlowtwins.app.cli",
    ]


def test_the_development_guide_lists_the_layers_in_this_order() -> None:
    # The one written table of the layers: docs/development.md, top first.
    text = _DEVELOPMENT.read_text()
    table = re.search(r"<!-- layers-start -->(.*?)<!-- layers-end -->", text, re.DOTALL)
    assert table is not None
    rows = re.findall(r"^\| `([a-z]+)/?` \|", table.group(1), re.MULTILINE)
    assert rows == list(reversed(_LAYERS))


def test_every_public_name_imports() -> None:
    for name in barlowtwins.__all__:
        assert getattr(barlowtwins, name) is not None


def test_the_readme_library_example_runs() -> None:
    block = re.search(
        r"<!-- library-start -->\s*```python\n(.*?)```", _README.read_text(), re.DOTALL
    )
    assert block is not None
    exec(compile(block.group(1), "README.md", "exec"), {})
