"""The GPU check: prepare here, then run every GPU measurement in one offline call.

``prepare`` runs where package registries answer. It fills two folders that git ignores and
the device tool carries: ``.whl/`` with the wheels the GPU machine's image lacks (``WHEELS``)
and ``.data/fashion-mnist/`` with the four Fashion-MNIST idx files, and prints what the call
carries against its 64 MiB limit.

``run`` runs on the GPU machine, from the repository root, with no network: it installs the
wheels into /tmp/site, puts /tmp/site and ``src`` on ``PYTHONPATH`` (the project is not
installed there), then runs the steps in turn, each timed and each allowed to fail without
stopping the rest, within one time budget. It prints one markdown table and writes it, one
combined log, a JSON summary and the two fits' ``results.json`` under ``$OUT`` when that is
set (the device tool brings back at most 8 files from there), else under runs/gpu_check/.

``run --smoke`` runs the same steps at toy size on a CPU, in the current environment: the
CUDA tests skip and everything else runs on the CPU.

Usage: ``bash benchmarks/gpu_check.sh prepare|run|cpu-smoke`` (a thin wrapper of this file).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
WHEELS_DIR = ROOT / ".whl"
DATA_DIR = ROOT / ".data" / "fashion-mnist"
SITE = Path("/tmp/site")
WORK_DIR = ROOT / "runs" / "gpu_check" / "work"
# What the GPU machine's image lacks (by its list of installed packages), pinned to the
# versions tested here. lightly declares hydra-core, but lightly.loss, lightly.models.modules
# and lightly.transforms never import it (nor omegaconf, antlr4, aenum or lightly-utils); the
# timm and huggingface-hub they do import are in the image. pydantic 2.14 needs
# typing-extensions >= 4.16, likely newer than the image's.
WHEELS = (
    "annotated-types==0.8.0",
    "lightly==1.6.0",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "typing-extensions==4.16.0",
    "typing-inspection==0.4.5",
)
# The GPU machine: x86-64 Linux, CPython 3.12. pip matches each manylinux tag exactly.
_TARGET_PYTHON = "3.12"
_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# Where the Debian package dataset-fashion-mnist puts the files (as barlowtwins.data knows).
FASHION_MNIST_SOURCE = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_MIB = 2**20
# The device tool's limit on everything a call carries.
_CARRY_LIMIT_BYTES = 64 * _MIB
# The device tool allows 10 minutes a command; the check keeps to 8 and leaves the rest.
_RUN_BUDGET_SECONDS = 470
_SMOKE_BUDGET_SECONDS = 1800
# A step given less than this would only be cut off; it is skipped instead.
_MIN_STEP_SECONDS = 15
_FAILURE_LINES = 25
_STOP_GRACE_SECONDS = 10
# lightly's side augments PIL images in DataLoader workers: most of the GPU machine's 16 cores.
_GPU_WORKERS = 14
# One summary line of benchmarks/_common.py's Comparison.line().
_COMPARISON = re.compile(
    r"^(?P<metric>.+?): barlowtwins (?P<ours>[\d.]+) img/s vs lightly (?P<theirs>[\d.]+) img/s "
    r"-> (?P<ratio>[\d.]+)x better",
    re.MULTILINE,
)
_DATA_PATH_RATE = re.compile(r"^(?P<workers>\d+) workers: (?P<rate>[\d.]+) images/s$", re.MULTILINE)
_PYTEST_SUMMARY = re.compile(r"\d+ (passed|failed|skipped|deselected|errors?)\b")
# The versions the steps run with, and the imports the carried wheels must make work.
_IMPORT_CHECK = "; ".join(
    (
        "import importlib.metadata as metadata, torch",
        "import lightly.loss, lightly.models.modules, lightly.transforms, pydantic",
        "import barlowtwins.app.cli as cli",
        'names = "torch torchvision lightning lightly pydantic numpy pillow".split()',
        'print(", ".join(name + " " + metadata.version(name) for name in names))',
        'print("barlowtwins from", cli.__file__)',
    )
)


@dataclass
class Outcome:
    """What a step's output says: a one-line result, whether it is right, and its figures."""

    result: str
    ok: bool = True
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    """One command of the check and how to read its output.

    Attributes:
        key: Short name, used in the table and the log.
        what: What the step measures, for the table.
        command: The command, run from the repository root.
        cap_seconds: Longest the step may take (less when the budget runs short).
        read: Turns the step's combined output into its :class:`Outcome`.
    """

    key: str
    what: str
    command: list[str]
    cap_seconds: float
    read: Callable[[str], Outcome]


@dataclass
class StepResult:
    """A finished (or skipped) step, as the table and the JSON summary show it."""

    key: str
    what: str
    command: str
    result: str
    seconds: float
    status: str
    figures: dict[str, Any] = field(default_factory=dict)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="download the wheels and copy the data (needs PyPI)")
    run = commands.add_parser("run", help="run the check (on the GPU machine, offline)")
    run.add_argument("--smoke", action="store_true", help="toy sizes on a CPU, no wheels")
    run.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help=f"all steps together (default: {_RUN_BUDGET_SECONDS}; "
        f"{_SMOKE_BUDGET_SECONDS} with --smoke)",
    )
    return parser.parse_args()


# ---------------------------------------------------------------------------------------- prepare


def _wheel_key(name: str, version: str) -> tuple[str, str]:
    """A distribution as wheel file names spell it (PEP 427: lower case, ``_`` for ``-``)."""
    return re.sub(r"[-_.]+", "_", name).lower(), version


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _tree_bytes() -> int:
    """Bytes the device tool sends anyway: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    paths = (ROOT / name for name in listed.split("\0") if name)
    return sum(path.stat().st_size for path in paths if path.is_file())


def prepare() -> int:
    """Fill ``.whl/`` and ``.data/fashion-mnist/`` and print what the GPU call carries.

    Returns:
        The exit status: 0, or 1 when a wheel is missing or the carried files exceed 64 MiB.
    """
    WHEELS_DIR.mkdir(exist_ok=True)
    wanted = {_wheel_key(*spec.split("==")) for spec in WHEELS}
    # run installs .whl/*.whl: a wheel left from another pin would install twice and fail.
    for wheel in sorted(WHEELS_DIR.glob("*.whl")):
        if _wheel_key(*wheel.name.split("-")[:2]) not in wanted:
            print(f"removing {wheel.name}: not pinned in WHEELS")
            wheel.unlink()
    download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    download += ["--python-version", _TARGET_PYTHON, "--implementation", "cp"]
    download += [option for name in _PLATFORMS for option in ("--platform", name)]
    download += ["-d", str(WHEELS_DIR), *WHEELS]
    print("$", shlex.join(download), flush=True)
    if subprocess.run(download, cwd=ROOT).returncode != 0:
        print("pip download failed", file=sys.stderr)
        return 1
    found = collections.Counter(
        _wheel_key(*wheel.name.split("-")[:2]) for wheel in WHEELS_DIR.glob("*.whl")
    )
    if any(found[key] != 1 for key in wanted):
        print(f"expected one wheel of each of {sorted(wanted)}, found {found}", file=sys.stderr)
        return 1

    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        source, target = FASHION_MNIST_SOURCE / name, DATA_DIR / name
        if not source.is_file():
            print(f"{source} is missing (apt-get install dataset-fashion-mnist)", file=sys.stderr)
            return 1
        if not target.is_file() or target.stat().st_size != source.stat().st_size:
            shutil.copyfile(source, target)

    sizes = {
        "working tree": _tree_bytes(),
        ".whl": _folder_bytes(WHEELS_DIR),
        ".data": _folder_bytes(DATA_DIR.parent),
    }
    total = sum(sizes.values())
    parts = " + ".join(f"{name} {size / _MIB:.1f} MiB" for name, size in sizes.items())
    print(f"carried to the GPU machine: {parts} = {total / _MIB:.1f} MiB (limit 64 MiB)")
    if total > _CARRY_LIMIT_BYTES:
        print("too much to carry: the device tool refuses more than 64 MiB", file=sys.stderr)
        return 1
    print(
        'device call: run(command="bash benchmarks/gpu_check.sh run", '
        'carry=[".whl", ".data"], timeout_s=600)'
    )
    return 0


# -------------------------------------------------------------------------------- reading outputs


def _dig(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...``, or None where a level is missing."""
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _read_results(output: Path) -> dict[str, Any] | None:
    try:
        results = json.loads((output / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


def _percent(value: Any) -> str:
    return f"{value:.2f} %" if isinstance(value, (int, float)) else "missing"


def _read_pytest(text: str) -> Outcome:
    summaries = [line.strip("= ") for line in text.splitlines() if _PYTEST_SUMMARY.search(line)]
    return Outcome(summaries[-1] if summaries else "no pytest summary")


def _read_imports(text: str) -> Outcome:
    versions = [line for line in text.splitlines() if line.startswith("torch ")]
    return Outcome(versions[-1] if versions else "imports failed")


def _read_fit(output: Path) -> Outcome:
    results = _read_results(output)
    if results is None:
        return Outcome("no results.json", ok=False)
    k20 = _dig(results, "knn", "protocols", "k=20 T=0.07", "top1", "barlow twins")
    k200 = _dig(results, "knn", "protocols", "k=200 T=0.1", "top1", "barlow twins")
    minutes, training = results.get("minutes"), results.get("training_minutes")
    return Outcome(
        f"test kNN k=20 {_percent(k20)}, k=200 {_percent(k200)}; {minutes} min "
        f"({training} training)",
        figures={
            "knn_k20": k20,
            "knn_k200": k200,
            "minutes": minutes,
            "training_minutes": training,
        },
    )


def _read_ddp(output: Path, expected: str) -> Outcome:
    results = _read_results(output)
    batch_norm = _dig(results, "hardware", "batch_norm") if results else None
    batch_norm = "missing" if batch_norm is None else str(batch_norm)
    result = f"batch norm: {batch_norm}"
    if batch_norm != expected:
        result += f" (expected {expected})"
    if results is not None:
        result += f"; {results.get('minutes')} min"
    return Outcome(result, ok=batch_norm == expected, figures={"batch_norm": batch_norm})


def _figure(value: float) -> str:
    """Three significant digits, without scientific notation (as benchmarks/_common.py)."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _read_throughput(text: str, batch: int) -> Outcome:
    parts, figures = [], {}
    for match in _COMPARISON.finditer(text):
        name = "default paths" if "default paths" in match["metric"] else "equal fp32"
        ours, theirs = float(match["ours"]), float(match["theirs"])
        parts.append(
            f"{name}: ours {_figure(ours / batch)} steps/s ({_figure(ours)} img/s) vs lightly "
            f"{_figure(theirs / batch)} steps/s ({_figure(theirs)} img/s), {match['ratio']}x"
        )
        figures[name] = {"ours_img_s": ours, "lightly_img_s": theirs, "batch": batch}
    if not parts:
        return Outcome("no comparison printed", ok=False)
    return Outcome("; ".join(parts), figures=figures)


def _read_data_path(text: str) -> Outcome:
    rates = {int(m["workers"]): float(m["rate"]) for m in _DATA_PATH_RATE.finditer(text)}
    if not rates:
        return Outcome("no images/s printed", ok=False)
    result = "; ".join(f"{workers} workers {rate:.0f} images/s" for workers, rate in rates.items())
    return Outcome(result, figures={"images_per_second": rates})


# ------------------------------------------------------------------------------------------- steps


def _cuda_test_files() -> list[str]:
    """The test modules that hold CUDA tests.

    Collecting all of tests/ would import modules that need packages the GPU machine lacks
    (test_notebooks.py imports nbformat) and fail the whole run on a collection error.
    """
    tests = sorted((ROOT / "tests").glob("test_*.py"))
    return [str(path.relative_to(ROOT)) for path in tests if "mark.cuda" in path.read_text()]


def _install_step() -> Step:
    """Install the carried wheels into /tmp/site, offline (pip's options as the device tool's)."""
    wheels = sorted(str(path.relative_to(ROOT)) for path in WHEELS_DIR.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    command += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels]
    return Step(
        "wheels",
        "install .whl/*.whl into /tmp/site",
        command,
        120,
        lambda _text: Outcome(f"{len(wheels)} wheels", ok=bool(wheels)),
    )


def build_steps(smoke: bool, work: Path) -> list[Step]:
    """The check's steps: full size on a GPU, or toy size on a CPU with ``smoke``."""
    python = sys.executable
    fit = [python, "-m", "barlowtwins", "fit", "--no-plots"]
    resnet50 = ["--backbone", "resnet50", "--no-small-image", "--precision", "bf16-mixed"]
    resnet50 += ["--skip-equal"]
    if smoke:
        accelerator, device, batch_norm, batch = "cpu", "cpu", "GlobalBatchNorm", 4
        fit_size = ["--max-samples", "512", "--epochs", "1", "--val-max-samples", "200"]
        fit_size += ["--knn-bank-size", "256"]
        ddp_size = fit_size
        resnet18 = ["--batch", "4", "--num-images", "8", "--workers", "2", "--steps", "1"]
        resnet18 += ["--warmup", "0", "--repeats", "1"]
        resnet50 += [*resnet18, "--image-size", "64", "--projector", "256", "256", "256"]
        data_path = ["--count", "256", "--workers", "2", "--batches", "4", "--batch", "32"]
    else:
        accelerator, device, batch_norm, batch = "gpu", "cuda", "SyncBatchNorm", 256
        fit_size = []
        ddp_size = ["--max-samples", "4096", "--epochs", "1"]
        workers = ["--workers", str(_GPU_WORKERS)]
        # Few steps, so that the whole check fits its budget (ResNet-50: ~0.4 s a step), and
        # images for all of them: lightly's workers would idle at the end of an epoch.
        resnet18 = ["--batch", "256", "--num-images", "16384", *workers, "--steps", "20"]
        resnet18 += ["--warmup", "3", "--repeats", "3"]
        resnet50 += ["--batch", "256", "--num-images", "2560", *workers, "--image-size", "224"]
        resnet50 += ["--projector", "8192", "8192", "8192", "--steps", "4", "--warmup", "2"]
        resnet50 += ["--repeats", "2"]
        data_path = ["--count", "4096", "--workers", "8", str(_GPU_WORKERS), "--batches", "40"]
    fit_dir, ddp_dir = work / "fit", work / "ddp"
    ddp = ["--accelerator", accelerator, "--devices", "1", "--strategy", "ddp"]
    steps = [] if smoke else [_install_step()]
    return [
        *steps,
        Step(
            "imports",
            "versions; lightly and pydantic import",
            [python, "-c", _IMPORT_CHECK],
            90,
            _read_imports,
        ),
        Step(
            "cuda-tests",
            "pytest -m cuda (they skip without a GPU)",
            [python, "-m", "pytest", "-q", "-m", "cuda", *_cuda_test_files()],
            180,
            _read_pytest,
        ),
        Step(
            "fit",
            "fit, toy size" if smoke else "fit, default recipe (5 epochs of Fashion-MNIST)",
            [*fit, "--accelerator", accelerator, "--output", str(fit_dir), *fit_size],
            270,
            lambda _text: _read_fit(fit_dir),
        ),
        Step(
            "ddp",
            "fit under DDP on one device: which synchronised batch norm trained",
            [*fit, *ddp, "--output", str(ddp_dir), *ddp_size],
            150,
            lambda _text: _read_ddp(ddp_dir, batch_norm),
        ),
        Step(
            "resnet18",
            f"training steps/s vs lightly, ResNet-18 32 px, batch {batch}",
            [python, "benchmarks/throughput.py", "--device", device, *resnet18],
            120,
            lambda text: _read_throughput(text, batch),
        ),
        Step(
            "resnet50",
            f"training steps/s vs lightly, ResNet-50 {'64' if smoke else '224'} px, projector "
            f"{'256' if smoke else '8192'}^3, ours bf16, batch {batch}",
            [python, "benchmarks/throughput.py", "--device", device, *resnet50],
            150,
            lambda text: _read_throughput(text, batch),
        ),
        Step(
            "data-path",
            "JPEG folder 500x375 -> LazyImageFolder -> 224 px uint8 batches",
            [python, "benchmarks/data_path.py", "--size", "500x375", *data_path],
            120,
            _read_data_path,
        ),
    ]


# -------------------------------------------------------------------------------------------- run


def _emit(text: str, log: TextIO) -> None:
    print(text, flush=True)
    log.write(text + "\n")
    log.flush()


def _stop(process: subprocess.Popen[str]) -> None:
    """End the step's process group, its DataLoader workers too.

    SIGINT first: Python unwinds on it, so a benchmark deletes its temporary JPEG folder and
    Lightning shuts down cleanly; then SIGKILL for whatever is left after a grace period.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=_STOP_GRACE_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_step(step: Step, env: dict[str, str], log: TextIO, deadline: float) -> StepResult:
    """Run one step into the log, within its cap and what is left of the budget."""
    command = shlex.join("python" if part == sys.executable else part for part in step.command)
    remaining = deadline - time.monotonic()
    if remaining < _MIN_STEP_SECONDS:
        _emit(f"\n== {step.key}: skipped, {remaining:.0f} s of the budget left", log)
        return StepResult(step.key, step.what, command, "out of time", 0.0, "skipped")
    timeout = min(step.cap_seconds, remaining)
    _emit(f"\n== {step.key}: {command}  (at most {timeout:.0f} s)", log)
    lines: list[str] = []
    start = time.monotonic()
    # A new session makes the step a process group that one signal ends on a timeout.
    process = subprocess.Popen(
        step.command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )

    def copy_output() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            log.write(line)

    reader = threading.Thread(target=copy_output, daemon=True)
    reader.start()
    try:
        returncode: int | None = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(process)
        returncode = None
    reader.join(timeout=30)
    seconds = time.monotonic() - start
    log.flush()
    text = "".join(lines)
    outcome = step.read(text)
    if returncode is None:
        status = f"fail (timeout {timeout:.0f} s)"
    elif returncode != 0:
        status = f"fail (exit {returncode})"
    else:
        status = "pass" if outcome.ok else "fail"
    if status != "pass":
        tail = "".join(lines[-_FAILURE_LINES:])
        print(tail, end="" if tail.endswith("\n") else "\n")
    _emit(f"== {step.key}: {status} in {seconds:.1f} s: {outcome.result}", log)
    return StepResult(
        step.key, step.what, command, outcome.result, round(seconds, 1), status, outcome.figures
    )


def _card() -> str:
    try:
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"none (nvidia-smi: {error})"
    return query.stdout.strip().replace("\n", "; ") or f"none ({query.stderr.strip()})"


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return head.stdout.strip() or "unknown (no .git)"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _environment(smoke: bool) -> dict[str, str]:
    """The steps' environment: the carried wheels and the work tree's sources first."""
    paths = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    if not smoke:
        paths.insert(0, str(SITE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in paths if path)}
    # Output in the log as it happens, also when a step is stopped at its cap.
    env["PYTHONUNBUFFERED"] = "1"
    if DATA_DIR.is_dir():
        env["BARLOWTWINS_FASHION_MNIST_DIR"] = str(DATA_DIR)
    return env


def _table(header: str, results: list[StepResult]) -> str:
    rows = [
        header,
        "",
        "| step | what | result | seconds | status |",
        "| --- | --- | --- | ---: | --- |",
    ]
    for result in results:
        cells = (result.key, result.what, result.result, f"{result.seconds:.1f}", result.status)
        rows.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    passed = sum(result.status == "pass" for result in results)
    total = sum(result.seconds for result in results)
    rows.append(f"| all | | {passed} of {len(results)} passed | {total:.1f} | |")
    return "\n".join(rows)


def run(smoke: bool, budget_seconds: float | None) -> int:
    """Run every step, print the table and write it with the logs.

    Returns:
        0 when every step passed, else 1.
    """
    budget = budget_seconds or (_SMOKE_BUDGET_SECONDS if smoke else _RUN_BUDGET_SECONDS)
    deadline = time.monotonic() + budget
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "runs" / "gpu_check"
    out.mkdir(parents=True, exist_ok=True)
    # fit resumes from an existing output folder: each check starts from an empty one.
    shutil.rmtree(WORK_DIR, ignore_errors=True)
    WORK_DIR.mkdir(parents=True)
    env = _environment(smoke)
    card, torch_version = _card(), _version("torch")
    mode = "cpu-smoke" if smoke else "run"
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"GPU check ({mode}, {started}, commit {_commit()}): card {card}; "
        f"torch {torch_version}, python {platform.python_version()}"
    )
    if not smoke and not DATA_DIR.is_dir():
        print(f"warning: {DATA_DIR} is missing: run prepare here and carry .data", flush=True)
    with (out / "gpu_check.log").open("w") as log:
        _emit(header, log)
        _emit(f"PYTHONPATH={env['PYTHONPATH']}, budget {budget:.0f} s, output in {out}", log)
        results = [run_step(step, env, log, deadline) for step in build_steps(smoke, WORK_DIR)]
    table = _table(header, results)
    print("\n" + table, flush=True)
    (out / "gpu_check.md").write_text(table + "\n")
    summary = {"mode": mode, "card": card, "torch": torch_version, "header": header}
    summary["steps"] = [asdict(result) for result in results]
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name in ("fit", "ddp"):
        if (WORK_DIR / name / "results.json").is_file():
            shutil.copyfile(WORK_DIR / name / "results.json", out / f"{name}_results.json")
    return 0 if all(result.status == "pass" for result in results) else 1


def main() -> None:
    """Dispatch ``prepare`` or ``run``."""
    args = _parse_args()
    if args.command == "prepare":
        sys.exit(prepare())
    sys.exit(run(args.smoke, args.budget_seconds))


if __name__ == "__main__":
    main()
