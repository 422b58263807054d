# syntax=docker/dockerfile:1
# vaebm GPU image (the default, last stage) and the MLflow server image (target `mlflow`).
#
#   docker build -t REGISTRY/vaebm/vaebm:TAG .
#   docker build --target mlflow -t REGISTRY/vaebm/vaebm-mlflow:TAG .
#
# CUDA: torch comes from PyPI pinned by constraints/ci.txt (torch 2.14.1), whose Linux x86_64 wheels are CUDA 13.0
# builds that bundle their CUDA runtime, cuDNN and NCCL (the nvidia-*-cu13 wheels); DALI is the matching
# nvidia-dali-cuda130. The base image supplies the CUDA 13.0 user-space stack and the driver contract (R580+ driver on
# the nodes). Another CUDA line: build with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 (or cu128
# plus extra dali-cuda120 and a 12.x base) -- `torch==2.14.1` in the constraints also matches `2.14.1+cu130`.
# DeepSpeed ops are JIT-compiled into TORCH_EXTENSIONS_DIR only if enabled; that needs nvcc, i.e. a -devel base.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.5
ARG PYTHON_VERSION=3.11

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------------------------------------------
# Build: a Python 3.11 virtualenv in /opt/venv with the project's pinned dependencies (Ubuntu 24.04 ships 3.12, so the
# interpreter is python-build-standalone, installed by a pinned uv).
FROM ${CUDA_IMAGE} AS build
ARG PYTHON_VERSION
ARG TORCH_INDEX_URL=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 UV_NO_CACHE=1
RUN uv python install "${PYTHON_VERSION}" && uv venv --python "${PYTHON_VERSION}" /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
WORKDIR /opt/vaebm
# Dependencies first (cached layer), then the code.
COPY pyproject.toml README.md ./
COPY constraints/ constraints/
RUN mkdir -p core data_pipelines launchers \
 && uv pip install --python /opt/venv/bin/python -c constraints/ci.txt \
      ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple --index-strategy unsafe-best-match} \
      '.[dali]' \
 && uv pip uninstall --python /opt/venv/bin/python vaebm
COPY core/ core/
COPY data_pipelines/ data_pipelines/
COPY launchers/ launchers/
COPY conf/ conf/
# Editable on purpose: the launchers find conf/ next to core/ (core/training/config.py), so the code must run from
# /opt/vaebm, not from a copy in site-packages.
RUN uv pip install --python /opt/venv/bin/python --no-deps -e .

# ---------------------------------------------------------------------------------------------------------------------
# MLflow server image: same MLflow as the training clients, plus the PostgreSQL driver and boto3 for S3 artifacts.
FROM python:3.11.14-slim-bookworm AS mlflow
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY constraints/ci.txt /tmp/ci.txt
RUN pip install --no-cache-dir -c /tmp/ci.txt mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.40.55 \
 && rm /tmp/ci.txt \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp mlflow
USER 10001:10001
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health')"]
ENTRYPOINT ["mlflow"]
CMD ["server", "--host=0.0.0.0", "--port=5000"]

# ---------------------------------------------------------------------------------------------------------------------
# Runtime (default target): the CUDA runtime base, the venv and the code; runs as uid 10001, no credentials inside.
FROM ${CUDA_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/vaebm --shell /bin/bash vaebm
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/vaebm /opt/vaebm
# Writable locations default under $HOME; Kubernetes pods (read-only root fs) point them at an emptyDir instead.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/vaebm \
    TORCH_EXTENSIONS_DIR=/home/vaebm/.cache/torch_extensions \
    TRITON_CACHE_DIR=/home/vaebm/.cache/triton \
    MPLCONFIGDIR=/home/vaebm/.cache/matplotlib \
    OMP_NUM_THREADS=1 \
    NCCL_DEBUG=WARN \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1
WORKDIR /opt/vaebm
USER 10001:10001
CMD ["python", "launchers/train_nvae.py", "dry_run=true"]
