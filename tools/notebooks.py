"""Make the example notebooks from the example scripts, check them, or run them.

The scripts in ``examples/*/barlowtwins.py`` are the source: jupytext reads their ``# %%``
cell markers (its "percent" format). A cell tagged ``active-py`` runs only in the script (its
``parser.parse_args()`` reads the command line, which a kernel does not have); a cell tagged
``active-ipynb`` is commented out in the script and becomes code in the notebook (its
``parser.parse_args([...])`` sets the notebook's small run). The notebooks go to
``examples/notebooks/<name>/barlowtwins.ipynb`` without outputs, with cell ids numbered in
order, so the same script always gives the same file::

    python tools/notebooks.py            # write the notebooks
    python tools/notebooks.py --check    # exit 1 if one differs from its script
    python tools/notebooks.py --execute  # run each in a kernel of this Python, print times

References: jupytext's percent format and active cells,
https://jupytext.readthedocs.io/en/latest/formats-scripts.html; nbclient,
https://nbclient.readthedocs.io.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jupytext
import nbformat

EXAMPLES = ("pytorch", "pytorch_lightning", "pytorch_lightning_distributed")
ROOT = Path(__file__).resolve().parents[1]
SCRIPT_ONLY_TAG = "active-py"
NOTEBOOK_ONLY_TAG = "active-ipynb"
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def script_path(root: Path, example: str) -> Path:
    """The example script that a notebook is made from."""
    return root / "examples" / example / "barlowtwins.py"


def notebook_path(root: Path, example: str) -> Path:
    """Where the notebook of an example lives (the seed page's paths)."""
    return root / "examples" / "notebooks" / example / "barlowtwins.ipynb"


def notebook_text(script: str) -> str:
    """The ``.ipynb`` text made from an example script's source.

    Args:
        script: Python source with jupytext ``# %%`` cell markers.

    Returns:
        The notebook as nbformat 4 JSON, ending in a newline.
    """
    notebook = jupytext.reads(script, fmt="py:percent")
    cells = []
    for cell in notebook.cells:
        tags = cell.metadata.get("tags", [])
        if SCRIPT_ONLY_TAG in tags:
            continue
        # The tag only tells jupytext to comment the cell out in the script; in the
        # notebook it is an ordinary cell.
        remaining = [tag for tag in tags if tag != NOTEBOOK_ONLY_TAG]
        cell.metadata.pop("tags", None)
        if remaining:
            cell.metadata["tags"] = remaining
        cell.id = f"cell-{len(cells)}"
        cells.append(cell)
    notebook.cells = cells
    # Only what Jupyter needs to pick a kernel; jupytext's own metadata (its version, the
    # pairing) would make the file depend on the installed jupytext.
    notebook.metadata = nbformat.from_dict(
        {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    )
    nbformat.validate(notebook)
    return nbformat.writes(notebook) + "\n"


def stale_notebooks(root: Path) -> list[Path]:
    """The notebooks under ``root`` that are missing or differ from their scripts."""
    stale = []
    for example in EXAMPLES:
        target = notebook_path(root, example)
        expected = notebook_text(script_path(root, example).read_text())
        if not target.is_file() or target.read_text() != expected:
            stale.append(target)
    return stale


def write_notebooks(root: Path) -> None:
    """Write every notebook under ``root`` from its script."""
    for example in EXAMPLES:
        target = notebook_path(root, example)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(notebook_text(script_path(root, example).read_text()))
        print(f"wrote {target.relative_to(root)}")


def execute_notebooks(root: Path, timeout: int) -> bool:
    """Run each notebook top to bottom in its own folder; returns whether all succeeded.

    The kernel is ipykernel under this Python (jupyter_client replaces the kernelspec's
    ``python`` with ``sys.executable``). Outputs are not written back.
    """
    # nbclient pulls in the Jupyter client stack: import it only where it is used.
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    succeeded = True
    for example in EXAMPLES:
        path = notebook_path(root, example)
        notebook = nbformat.read(path, as_version=4)
        client = NotebookClient(
            notebook,
            timeout=timeout,
            kernel_name=KERNELSPEC["name"],
            resources={"metadata": {"path": str(path.parent)}},
        )
        start = time.perf_counter()
        try:
            client.execute()
        except (CellExecutionError, CellTimeoutError) as error:
            succeeded = False
            print(f"{path.relative_to(root)}: FAILED: {str(error).strip()[-2000:]}")
            continue
        seconds = time.perf_counter() - start
        last = _last_line(notebook)
        print(f"{path.relative_to(root)}: ran in {seconds:.0f} s; last output: {last}")
    return succeeded


def _last_line(notebook: nbformat.NotebookNode) -> str:
    for cell in reversed(notebook.cells):
        for output in reversed(cell.get("outputs", [])):
            text = output.get("text", "").strip()
            if text:
                return text.splitlines()[-1][-200:]
    return "(none)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if a notebook is out of date")
    mode.add_argument("--execute", action="store_true", help="run every notebook")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository root")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (--execute)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.check:
        stale = stale_notebooks(root)
        for path in stale:
            print(f"{path.relative_to(root)} is out of date: run python tools/notebooks.py")
        return 1 if stale else 0
    if args.execute:
        return 0 if execute_notebooks(root, args.timeout) else 1
    write_notebooks(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
