"""Each benchmark runs end to end at toy sizes (against lightly where it compares).

The figures at these sizes mean nothing and are not checked; the tests keep the scripts
runnable (one of them once broke silently when a helper it imports changed) and their
summary lines in the documented form.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# "<metric>: barlowtwins <ours> <unit> vs lightly <theirs> <unit> -> <ratio>x better (target <t>x)"
_SUMMARY = re.compile(
    r"^.+: barlowtwins [\d.]+ \S+ vs lightly [\d.]+ \S+ -> [\d.]+x better \(target [\d.]+x\)$",
    re.MULTILINE,
)
_TINY_TRAINING = ["--batch", "4", "--num-images", "8", "--steps", "1", "--warmup", "0"]
# Lines beyond the summaries that a script must print: loss.py's mixed-precision part gives
# each side's time with its precision and its error against float64.
_RELATIVE_ERROR = r"relative error vs float64 \d\.\de[+-]\d+"
_REQUIRED_LINES = {
    "loss.py": re.compile(
        rf"^loss fwd\+bwd time, default paths under bf16-mixed autocast .+: "
        rf"barlowtwins .+ \(bf16-mixed, returns float32, {_RELATIVE_ERROR}\) vs "
        rf"lightly .+ \(bf16-mixed, returns \w+, {_RELATIVE_ERROR}\) -> [\d.]+x",
        re.MULTILINE,
    ),
}


def _run(
    script: str, options: list[str], timeout: int, *, threads: bool = True
) -> subprocess.CompletedProcess[str]:
    """``benchmarks/SCRIPT`` on one thread (options last: --fit-args takes the rest); it must
    succeed without a traceback. ``threads=False`` for a script without ``--threads``."""
    one_thread = ["--threads", "1"] if threads else []
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *one_thread, *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "options", "summaries"),
    [
        ("loss.py", ["--dims", "64", "--batch", "16", "--min-seconds", "0.01"], 2),
        ("augment.py", ["--sizes", "32", "--batch", "8", "--min-seconds", "0.01"], 1),
        ("throughput.py", _TINY_TRAINING, 2),
        ("throughput.py", [*_TINY_TRAINING, "--fit-network"], 2),
        ("memory.py", _TINY_TRAINING, 1),
    ],
)
def test_benchmark_prints_its_comparisons(script: str, options: list[str], summaries: int) -> None:
    result = _run(script, [*options, "--repeats", "1"], timeout=300)
    assert len(_SUMMARY.findall(result.stdout)) == summaries, result.stdout[-2000:]
    if script in _REQUIRED_LINES:
        assert _REQUIRED_LINES[script].search(result.stdout), result.stdout[-2000:]


@pytest.mark.slow
def test_compile_benchmark_times_eager_against_compiled() -> None:
    options = ["--batch", "4", "--variants", "compiled", "--min-seconds", "0.01"]
    result = _run("compile.py", [*options, "--precision", "32-true", "--repeats", "1"], 600)
    assert re.search(r"^eager: \d+ ms a step, 1.00x eager's speed$", result.stdout, re.M)
    compiled = r"^compiled: \d+ ms a step, [\d.]+x eager's speed; compiling took -?\d+ s"
    assert re.search(compiled, result.stdout, re.M), result.stdout[-2000:]


@pytest.mark.slow
def test_quality_benchmark_compares_and_plots_time_to_accuracy(tmp_path: Path) -> None:
    """A toy fit (512 images, 2 epochs), lightly for as long, both curves and the plot."""
    plot, run = tmp_path / "time_to_accuracy.png", tmp_path / "run"
    fit_args = ["--max-samples", "512", "--epochs", "2", "--batch-size", "64"]
    fit_args += ["--val-max-samples", "200", "--knn-bank-size", "256", "--projector-dims", "32"]
    fit_args += ["--no-plots"]
    ours = []
    # Once training its own fit run, once comparing that finished run (--run).
    for source in (["--output", str(run), "--fit-args", *fit_args], ["--run", str(run)]):
        result = _run("quality.py", ["--workers", "0", "--plot", str(plot), *source], timeout=600)
        assert len(_SUMMARY.findall(result.stdout)) == 1, result.stdout[-2000:]
        curves = re.findall(r"^  (barlowtwins|lightly): +(.+)$", result.stdout, re.MULTILINE)
        assert [name for name, _ in curves] == ["barlowtwins", "lightly"]
        # One point per epoch a side: lightly is scored when its clock passes each epoch's.
        assert all(len(re.findall(r"[\d.]+ min [\d.]+ %", points)) == 2 for _, points in curves)
        assert plot.stat().st_size > 10_000
        ours.append(curves[0][1])
    assert ours[0] == ours[1], "--run did not compare the finished run's own curve"


@pytest.mark.slow
def test_data_path_benchmark_writes_then_reuses_a_jpeg_folder(tmp_path: Path) -> None:
    """40 tiny JPEGs written into --folder, then reused; one images/s line per worker count."""
    folder = tmp_path / "jpegs"
    options = ["--folder", str(folder), "--count", "40", "--size", "64x48", "--image-size", "32"]
    options += ["--batch", "8", "--batches", "2", "--workers", "0", "2"]
    for expected in ("wrote 40 JPEGs of 64x48", "reusing 40 JPEGs"):
        result = _run("data_path.py", options, timeout=300, threads=False)
        assert expected in result.stdout, result.stdout
        rates = re.findall(r"^(\d+) workers: [\d.]+ images/s$", result.stdout, re.MULTILINE)
        assert rates == ["0", "2"], result.stdout
    assert len(list(folder.glob("*.jpg"))) == 40


@pytest.mark.slow
def test_supervised_ceiling_trains_for_its_minutes_and_scores_both_protocols(
    tmp_path: Path,
) -> None:
    report = tmp_path / "supervised.json"
    options = ["--minutes", "0.05", "--max-samples", "300", "--json", str(report)]
    _run("supervised.py", options, timeout=300)
    results = json.loads(report.read_text())
    assert results["steps"] >= 1 and 0 <= results["head_test_accuracy"] <= 100
    assert set(results["knn"]) == {"k=20 T=0.07", "k=200 T=0.1"}
    for scores in results["knn"].values():
        assert set(scores) == {"supervised", "raw pixels"}
