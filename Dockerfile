# The demo Director with its control plane: on a GPU, or on the simulated card
# (VORTEX_BACKEND=simulated). torch is PyPI's CUDA 13 build of 2.13.0 (the pyproject floor),
# which carries its own CUDA runtime: the host needs only an NVIDIA driver for CUDA 13 and the
# NVIDIA Container Toolkit (compose.yaml reserves the GPU).
#
# The base image is pinned by tag. Pin it by digest too (what a rebuild must reproduce):
#   docker buildx imagetools inspect python:3.11-slim-bookworm --format '{{json .Manifest.Digest}}'
# and write the digest after the tag: FROM python:3.11-slim-bookworm@sha256:<that digest>.
# (Not done here: the machines this file is written on cannot reach Docker Hub.)
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VORTEX_HOST=0.0.0.0 VORTEX_PORT=8000 \
    VORTEX_MEMORY_HISTORY_DIR=/var/lib/vortex/vram-postmortem

WORKDIR /opt/vortex
COPY docker/constraints.txt ./
COPY pyproject.toml README.md settings.env ./
COPY app ./app
# Every package pinned by docker/constraints.txt (regenerate with docker/update-constraints.sh);
# PIP_CONSTRAINT also reaches the isolated build of this project, so setuptools is pinned too.
# The OOM post-mortem folder belongs to the non-root user (compose mounts a volume there).
RUN PIP_CONSTRAINT=/opt/vortex/constraints.txt pip install --no-cache-dir . \
 && python -c "import torch; v = torch.__version__; assert v.split('+')[0] == '2.13.0', v" \
 && groupadd --system --gid 10001 vortex \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin vortex \
 && mkdir -p "$VORTEX_MEMORY_HISTORY_DIR" \
 && chown -R vortex:vortex /var/lib/vortex

# Numeric, so that runtimes can check it is not root without reading /etc/passwd.
USER 10001:10001
EXPOSE 8000
# /readyz, not /healthz: it answers 503 until pre-flight passed and the models are loaded, and
# again while a generation has run longer than VORTEX_STALL_AFTER_S (a hung loop), where
# /healthz would still say ok. The start period covers loading five models (11 GB) from disk,
# during which failures do not count. Docker only reports "unhealthy"; it does not restart the
# container for it (VortexDirectorLoopStalled pages, see docs/runbook.md).
HEALTHCHECK --interval=15s --timeout=3s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('VORTEX_PORT', '8000')}/readyz\", timeout=2)"]

# Off loopback the control plane needs a token: VORTEX_TOKEN_FILE (compose secrets).
ENTRYPOINT ["python", "-m", "app"]
