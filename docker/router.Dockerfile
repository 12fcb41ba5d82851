# syntax=docker/dockerfile:1
# Baton's router image: the OpenAI HTTP and gRPC front, and `baton autoscale`. CPU only and
# torch-free: the router tokenizes with `tokenizers`/`transformers` and never imports torch.
#   docker build -f docker/router.Dockerfile -t baton-router .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/tmp/huggingface

WORKDIR /opt/baton

# The router's dependencies only (no torch, no engine), at the lock's versions; kubernetes is
# the client of the router's worker discovery (EndpointSlices) and of the autoscaler. `baton` itself goes in without its dependencies (they name torch).
COPY requirements.lock ./
RUN grep -v '^torch==' requirements.lock > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt \
        fastapi uvicorn grpcio grpcio-health-checking grpcio-reflection protobuf \
        prometheus-client redis xxhash tokenizers transformers jinja2 pyyaml httpx kubernetes \
        setuptools \
    && rm /tmp/constraints.txt

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
RUN pip install --no-deps --no-build-isolation . \
    && python -c "import router.server, launcher.cli, sys; assert 'torch' not in sys.modules" \
    && useradd --system --uid 10001 --no-create-home baton
USER 10001
EXPOSE 8000 50051
ENTRYPOINT []
CMD ["python", "-m", "router", "--help"]
