# syntax=docker/dockerfile:1
# Baton's worker image: prefill and decode workers on an NVIDIA GPU (CUDA 12.8), with torch's
# CUDA build, Triton (its kernels compile at run time: gcc) and cupy (NCCL KV transfer).
#   docker build -f docker/worker.Dockerfile -t baton-worker .
FROM ghcr.io/astral-sh/uv:0.13.8 AS uv

FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG CUPY_VERSION=14.2.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Triton builds its launcher with a C compiler when a kernel first runs. Ubuntu's security
# updates replace exact package versions, so they are not pinned (the base image tag is).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Python 3.11 (the lock's), standalone, and a virtual environment.
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install 3.11 && uv venv --python 3.11 /opt/venv

WORKDIR /opt/baton

# torch's CUDA build first; then the lock (its CPU torch line dropped: the CUDA build already
# satisfies the version), then the GPU extra.
COPY requirements.lock ./
RUN uv pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && grep -v '^torch==' requirements.lock > /tmp/requirements.txt \
    && uv pip install -r /tmp/requirements.txt "cupy-cuda12x==${CUPY_VERSION}" \
    && rm /tmp/requirements.txt

COPY pyproject.toml README.md ./
COPY common ./common
COPY router ./router
COPY proto ./proto
COPY prefix_index ./prefix_index
COPY cluster ./cluster
COPY launcher ./launcher
COPY worker_common ./worker_common
COPY engine ./engine
COPY baton_kernels ./baton_kernels
COPY kv_transfer ./kv_transfer
COPY prefill_service ./prefill_service
COPY decode_service ./decode_service
COPY bench ./bench
RUN uv pip install --no-deps --no-build-isolation . \
    && useradd --system --uid 10001 --create-home baton
USER 10001
ENV TRITON_CACHE_DIR=/tmp/triton
EXPOSE 50061 50071 9100
CMD ["python", "-m", "prefill_service", "--help"]
