"""The example notebooks are made from the example scripts by tools/notebooks.py.

CI runs them top to bottom (``python tools/notebooks.py --execute`` in .ci/run); these tests
check, in seconds, that the committed notebooks are the ones the scripts give today and that
a notebook sets its own small run instead of reading the kernel's command line.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "notebooks.py"
EXAMPLES = ["pytorch", "pytorch_lightning", "pytorch_lightning_distributed"]


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120
    )


def _copy_examples(destination: Path) -> None:
    for example in EXAMPLES:
        for relative in (
            Path("examples", example, "barlowtwins.py"),
            Path("examples", "notebooks", example, "barlowtwins.ipynb"),
        ):
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / relative, destination / relative)


def test_committed_notebooks_match_their_scripts() -> None:
    result = _tool("--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_names_a_stale_notebook_and_writing_fixes_it(tmp_path: Path) -> None:
    _copy_examples(tmp_path)
    script = tmp_path / "examples" / "pytorch_lightning" / "barlowtwins.py"
    script.write_text(script.read_text() + '\n# %%\nprint("one more cell")\n')

    stale = _tool("--check", "--root", str(tmp_path))
    assert stale.returncode == 1
    assert stale.stdout.splitlines() == [
        "examples/notebooks/pytorch_lightning/barlowtwins.ipynb is out of date: "
        "run python tools/notebooks.py"
    ]

    assert _tool("--root", str(tmp_path)).returncode == 0
    assert _tool("--check", "--root", str(tmp_path)).returncode == 0
    notebook = nbformat.read(
        tmp_path / "examples" / "notebooks" / "pytorch_lightning" / "barlowtwins.ipynb", 4
    )
    assert notebook.cells[-1].source == 'print("one more cell")'


@pytest.mark.parametrize("example", EXAMPLES)
def test_notebook_sets_its_small_run_and_skips_the_command_line(example: str) -> None:
    notebook = nbformat.read(ROOT / "examples" / "notebooks" / example / "barlowtwins.ipynb", 4)
    nbformat.validate(notebook)
    first = notebook.cells[0]
    assert first.cell_type == "markdown"
    assert "For the full" in first.source
    sources = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    # The script's parse_args() reads sys.argv, which in a kernel holds the kernel's own flags.
    assert not any("parser.parse_args()" in source for source in sources)
    small_runs = [source for source in sources if source.startswith("args = parser.parse_args([")]
    assert len(small_runs) == 1
    assert '"--epochs", "1", "--max-samples", "2048"' in small_runs[0]
    assert ("ddp_notebook" in small_runs[0]) == (example == "pytorch_lightning_distributed")
    assert all(not cell.get("outputs") for cell in notebook.cells)
