"""Sphinx configuration of the barlowtwins documentation.

Build offline, warnings as errors (what CI runs)::

    pip install -e ".[docs]"
    sphinx-build -W -b html docs docs/_build/html
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import make_refnode

import barlowtwins

project = "barlowtwins"
author = "the barlowtwins developers"
copyright = "2025, the barlowtwins developers"
release = version = barlowtwins.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_design",
    "sphinxarg.ext",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
templates_path = ["_templates"]
html_theme = "furo"
html_title = f"barlowtwins {release}"
# Option names stay as typed: no en dash for the ``--`` of ``--output`` in help texts.
smartquotes_action = "qe"

# Markdown pages: ``:::{directive}`` fences and heading anchors for links like page.md#part.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# The API pages are generated from the package on every build (docs/_autosummary is not
# kept in git), so moving a module needs no edit here.
autosummary_generate = True
# Importing ``python -m barlowtwins``'s module would run the command line.
autosummary_mock_imports = ["barlowtwins.__main__"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Every reference to our own objects must resolve. The machine that builds the site is
# offline, so other projects' inventories (intersphinx) cannot be fetched: their names are
# exempt.
nitpicky = True
_EXTERNAL = (
    r"(torch|torchvision|lightning|L|nn|np|numpy|PIL|Image|matplotlib|sklearn|yaml|timm|pydantic|"
    r"abc|argparse|collections|dataclasses|logging|os|pathlib|typing|types|concurrent|"
    r"multiprocessing|signal|subprocess|threading|io|contextlib|litdata|boto3)(\..+)?"
)
nitpick_ignore_regex = [
    (r"py:.*", _EXTERNAL),
    # Builtins and typing names that appear in annotations.
    (
        r"py:.*",
        r"(Any|Callable|Iterable|Iterator|Mapping|Sequence|Path|Tensor|Module|Parameter|"
        r"Optional|Union|Literal|Self|NoneType|None|int|float|str|bool|bytes|dict|list|tuple|"
        r"set|object|type|Exception|ValueError|OSError|RuntimeError|TypeError|KeyError)",
    ),
]
# Lightning's docstrings of the hooks we override use roles of its own site.
autodoc_inherit_docstrings = False


def _resolve_short_name(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: nodes.Element
) -> nodes.Element | None:
    """Resolve ``:class:`BarlowTwinsLoss``` from any module to the one object of that name.

    Our docstrings name the package's objects without their module (the modules are being
    regrouped); Sphinx only looks in the current module, or searches by suffix when the name
    starts with a dot. This does that search for every unresolved Python reference, and
    leaves a name that matches none or several objects unresolved (a warning under -W).
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    domain: Any = env.get_domain("py")
    # A re-exported name (``barlowtwins.data.load_data``) is documented where it is defined
    # (``barlowtwins.data.sources.load_data``): search below its package for its last part.
    package, _, short = target.rpartition(".")
    if package.startswith("barlowtwins"):
        prefix, suffix = package + ".", "." + short
    else:
        prefix, suffix = "barlowtwins.", "." + target
    matches = [
        (name, obj)
        for name, obj in domain.objects.items()
        if name.startswith(prefix) and name.endswith(suffix)
    ]
    if len(matches) != 1:
        return None
    name, obj = matches[0]
    return make_refnode(app.builder, node["refdoc"], obj.docname, obj.node_id, contnode, name)


class RecipesDirective(SphinxDirective):
    """``.. barlowtwins-recipes::``: every recipe of the registry, generated on each build.

    One table of what each recipe is for, its source and results, then each recipe's values,
    so the page can never disagree with ``barlowtwins recipes``.
    """

    def run(self) -> list[nodes.Node]:
        from barlowtwins.app.recipes import RECIPES
        from barlowtwins.hparams import Hyperparameters

        def cell(value: object) -> str:
            shown = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
            return f"``{shown}``"

        lines = [".. list-table::", "   :header-rows: 1", ""]
        lines += ["   * - recipe", "     - for", "     - source", "     - published", "     - here"]
        for recipe in RECIPES.values():
            lines += [f"   * - ``{recipe.name}``"]
            for text in (recipe.purpose, recipe.source, recipe.published, recipe.measured):
                lines += [f"     - {text}"]
        lines += ["", ".. list-table::", "   :header-rows: 1", ""]
        lines += ["   * - hyperparameter"] + [f"     - ``{name}``" for name in RECIPES]
        for name in Hyperparameters.names():
            lines += [f"   * - ``{name}``"]
            lines += [
                f"     - {cell(getattr(recipe.hparams, name))}" for recipe in RECIPES.values()
            ]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="barlowtwins-recipes"), 0, container)
        return container.children


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("missing-reference", _resolve_short_name)
    app.add_directive("barlowtwins-recipes", RecipesDirective)
    return {"parallel_read_safe": True}
