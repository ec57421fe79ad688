# syntax=docker/dockerfile:1
# Images of the OneRec serving stack (docker-compose.yml builds them). Targets:
#   gateway   - the FastAPI gateway on python:3.11-slim with the CPU torch build, non-root; also runs the
#               `onerec load-histories` job.
#   loadtest  - the gateway image plus the dev and bench extras (locust, matplotlib) and loadtest/.
#   triton    - the official Triton Inference Server image with the project installed; serves model_repo/.
#   trainer   - the triton image running prepare -> tokenize -> train -> export on mounted data (a one-shot job).
# The gateway stages come first: the legacy builder (docker-compose 1.x without BuildKit) builds every stage up
# to the target, and the gateway should not wait for the multi-GB Triton base image.
#
# Every image installs the project editable (`pip install -e .`) from /app: `onerec export` finds the committed
# config template and backend adapter (model_repo/onerec/) relative to its own source file, which a regular
# install would leave behind in /app.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

# --- gateway ----------------------------------------------------------------------------------------------
# bookworm (glibc 2.36): the nvidia-pytriton dependency ships manylinux_2_35 wheels only.
FROM ${PYTHON_IMAGE} AS gateway
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch==2.13.0 from PyPI is a multi-GB CUDA build on x86_64; the gateway never runs a model, so the CPU build
# comes first from PyTorch's CPU index (2.13.0+cpu satisfies the project's torch==2.13.0 pin below).
RUN pip install --upgrade pip \
 && pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /app
COPY pyproject.toml README.md ./
COPY onerec ./onerec
COPY export ./export
COPY service ./service
COPY stack ./stack
COPY cli ./cli
COPY model_repo ./model_repo
RUN pip install -e .
# A fixed numeric uid, so that orchestrators can verify "not root" (Kubernetes runAsNonRoot) without /etc/passwd.
# /srv/users: where the histories job writes the loaded user ids (a named volume takes this owner on first use).
RUN groupadd --gid 10001 onerec && useradd --create-home --uid 10001 --gid 10001 onerec \
 && mkdir -p /srv/users && chown 10001:10001 /srv/users
USER 10001:10001
EXPOSE 8080
# Liveness only (slim has no curl). docker-compose.yml probes /readyz instead, to gate the services behind it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# = stack.commands.gateway_args("0.0.0.0", 8080); settings come from ONEREC_* variables (service/settings.py).
CMD ["onerec", "serve", "--host", "0.0.0.0", "--port", "8080", "--workers", "1"]

# --- loadtest ---------------------------------------------------------------------------------------------
# locust (dev extras) and matplotlib (bench extras, for the report's plot) at the versions pyproject.toml pins.
FROM gateway AS loadtest
# Not a server: drop the gateway's HEALTHCHECK.
HEALTHCHECK NONE
USER root
RUN pip install -e '.[dev,bench]'
COPY loadtest ./loadtest
# locust puts the locustfile's own directory on sys.path; /app makes `import loadtest.<module>` work too.
ENV PYTHONPATH=/app
USER 10001:10001
# docker-compose.yml runs the headless runner (python -m loadtest.run) with the users and videos files.
CMD ["python", "-m", "loadtest.run", "--help"]

# --- triton -----------------------------------------------------------------------------------------------
# The official 24.10 image ships tritonserver 2.51 (the same release as the nvidia-pytriton 0.7.0 wheel the
# local stack uses) but Python 3.10; the project needs 3.11, so the container runs exactly what
# `onerec triton` runs locally: the wheel's server binary and its Python 3.11 backend stub, with the
# image's CUDA libraries underneath.
FROM ${TRITON_IMAGE} AS triton
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch==2.13.0 from PyPI is the CUDA build; in its own layer, so a source change does not download it again.
RUN pip install --upgrade pip \
 && pip install torch==2.13.0
WORKDIR /app
COPY pyproject.toml README.md ./
COPY onerec ./onerec
COPY export ./export
COPY service ./service
COPY stack ./stack
COPY cli ./cli
COPY model_repo ./model_repo
# onnxruntime-gpu replaces the CPU wheel (same API, CUDA provider).
RUN pip install -e . \
 && pip uninstall -y onnxruntime \
 && pip install onnxruntime-gpu==1.31.1
RUN useradd --create-home --uid 10001 triton-user && mkdir -p /models /work && chown triton-user /work
USER triton-user
EXPOSE 8000 8001 8002
# /models: an exported repository (`onerec export --out model_repo`), mounted read-only.
# = stack.commands.triton_args("/models", "0.0.0.0", "/work").
CMD ["onerec", "triton", "--model-repo", "/models", "--host", "0.0.0.0", "--workdir", "/work", \
     "--http-port", "8000", "--grpc-port", "8001", "--metrics-port", "8002"]

# --- trainer ----------------------------------------------------------------------------------------------
# A one-shot job: `make demo` + `make export` on mounted directories. The CUDA torch build trains on the GPU and
# `onerec export` (precision/device auto) then writes fp16 graphs and a GPU instance group. Stages already
# finished in the run directory are reused; every run adds a new model version to the repository.
FROM triton AS trainer
ENV DATA_DIR=/srv/data RUN_DIR=/srv/runs/ml-100k PRESET=small REPO_DIR=/srv/model_repo HOME=/tmp
USER root
RUN mkdir -p /srv/data /srv/runs /srv/model_repo && chown triton-user /srv/runs /srv/model_repo
USER triton-user
CMD ["sh", "-c", "set -e; \
onerec prepare --source movielens --path \"$DATA_DIR\" --out \"$RUN_DIR\" --reuse; \
onerec tokenize --run \"$RUN_DIR\" --reuse; \
onerec train --run \"$RUN_DIR\" --preset \"$PRESET\" --reuse; \
onerec export --run \"$RUN_DIR\" --out \"$REPO_DIR\" --verify"]
