# syntax=docker/dockerfile:1
# Images of the OneRec serving stack. Targets:
#   triton  - the official Triton Inference Server image with the project installed; serves model_repo/.
# (The gateway target and docker-compose.yml come with the gateway.)
#
# The official 24.10 image ships tritonserver 2.51 (the same release as the nvidia-pytriton 0.7.0 wheel the
# local stack uses) but Python 3.10; the project needs 3.11, so the container runs exactly what
# `onerec triton` runs locally: the wheel's server binary and its Python 3.11 backend stub, with the
# image's CUDA libraries underneath.

ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

FROM ${TRITON_IMAGE} AS triton
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY onerec ./onerec
COPY export ./export
COPY model_repo ./model_repo
# torch==2.13.0 from PyPI is the CUDA build; onnxruntime-gpu replaces the CPU wheel (same API, CUDA provider).
RUN pip install --upgrade pip \
 && pip install . \
 && pip uninstall -y onnxruntime \
 && pip install onnxruntime-gpu==1.31.1
RUN useradd --create-home --uid 10001 triton-user && mkdir -p /models /work && chown triton-user /work
USER triton-user
EXPOSE 8000 8001 8002
# /models: an exported repository (`onerec export --out model_repo`), mounted read-only.
CMD ["onerec", "triton", "--model-repo", "/models", "--host", "0.0.0.0", "--workdir", "/work"]
