# easel's container images, two targets:
#
#   api     the core install (no torch): API nodes, Redis-mode API roles, stub workers
#   worker  + the [gpu] extra (Diffusers, torch, torchao): GPU workers, GPUs through the
#           NVIDIA container runtime
#   gradio  + the [gradio] extra: the Gradio front-end (python3 -m clients.gradio_app)
#
#   podman build --format docker --target api -t easel-api .
#   podman build --format docker --target worker -t easel-worker .
#   podman build --format docker --target worker --build-arg EXTRAS=diffusers -t easel-worker-cpu \
#       --build-arg TORCH="torch==2.14.1+cpu torchvision==0.29.1+cpu --extra-index-url https://download.pytorch.org/whl/cpu" .
#
# BASE: any image with python3 >= 3.11 and its venv module (default: the official slim
# Python image). pip reads whatever pip configuration the build mounts (an index URL, a
# CA bundle: `podman build -v /etc/pip.conf:/etc/pip.conf:ro ...`); nothing of it is
# baked into the image.
#
# Configuration: a settings file mounted at /srv/easel/local.json (the working
# directory), or EASEL_CONFIG; EASEL_BROKER, EASEL_ROLE, EASEL_PORT, EASEL_LOG_LEVEL
# stand in for the flags of `easel serve`. Models are mounted at /models.
ARG BASE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE} AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/easel/bin:$PATH \
    EASEL_HOST=0.0.0.0 \
    EASEL_PORT=4030 \
    HF_HOME=/srv/easel/.cache/huggingface
RUN python3 -m venv /opt/easel \
 && useradd --uid 10001 --user-group --create-home --home-dir /srv/easel easel \
 && mkdir -p /models
COPY pyproject.toml README.md /src/
COPY server /src/server
COPY clients /src/clients
COPY static /src/static
WORKDIR /srv/easel
EXPOSE 4030
# /healthz answers once the server is up (models still loading are shown by /health)
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EASEL_PORT', '4030') + '/healthz', timeout=4)"]
CMD ["easel", "serve"]

FROM base AS api
RUN pip install /src && rm -rf /src
USER easel

FROM base AS worker
# EXTRAS: gpu (Diffusers, torch, torchao), or diffusers (without torchao: a CPU-only worker).
# TORCH: pip arguments that pick torch's build, e.g. CPU wheels (PyTorch's CPU index, or a wheelhouse
# the mounted pip configuration names): pip then leaves out the CUDA libraries (~3 GB) that PyPI's
# torch pulls in. Default: PyPI's torch (CUDA).
ARG EXTRAS=gpu
ARG TORCH=""
ENV EASEL_ROLE=worker \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN pip install ${TORCH} "/src[${EXTRAS}]" && rm -rf /src
USER easel

FROM base AS gradio
RUN pip install "/src[gradio]" && rm -rf /src
USER easel
EXPOSE 7860
HEALTHCHECK NONE
CMD ["python3", "-m", "clients.gradio_app", "--server", "http://api:4030", "--host", "0.0.0.0", "--port", "7860"]
