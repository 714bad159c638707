#!/usr/bin/env bash
# The GPU check (docs/performance.md, "The GPU check"); the work is in benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh prepare    # here, where PyPI answers: fills .whl/ and .data/
#   bash benchmarks/gpu_check.sh run        # on the offline GPU machine (carry .whl and .data)
#   bash benchmarks/gpu_check.sh cpu-smoke  # the same steps at toy size on a CPU
# Further arguments go to gpu_check.py (e.g. run --budget-seconds 400); $PYTHON picks the
# interpreter, else the repository's .venv where there is one (not on the GPU machine), else
# python3.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
if [[ -n ${PYTHON:-} ]]; then
    python=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python=python3
fi
mode=${1:-}
(($#)) && shift
case $mode in
    prepare | run) exec "$python" benchmarks/gpu_check.py "$mode" "$@" ;;
    cpu-smoke) exec "$python" benchmarks/gpu_check.py run --smoke "$@" ;;
    *)
        echo "usage: bash benchmarks/gpu_check.sh prepare|run|cpu-smoke [options]" >&2
        exit 2
        ;;
esac
