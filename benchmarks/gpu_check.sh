#!/usr/bin/env bash
# One call on a GPU machine: the CUDA tests, then the side-by-side benchmarks on the same card.
# Needs `pip install -e ".[test,bench]"`. Prints the card's name first.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$python -m pytest -q -m cuda tests/test_cuda.py tests/test_augment.py
$python benchmarks/loss.py --device cuda
$python benchmarks/augment.py --device cuda
$python benchmarks/throughput.py --device cuda --batch 256
