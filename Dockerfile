# The demo Director with its control plane. A CUDA runtime image that already carries torch,
# so installing the project adds only the small pure-Python packages.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VORTEX_HOST=0.0.0.0 VORTEX_PORT=8000

WORKDIR /opt/vortex
COPY pyproject.toml README.md settings.env ./
COPY app ./app
# The image's torch satisfies torch>=2.1, so pip keeps it and adds only the small packages.
RUN pip install . \
 && useradd --system --uid 10001 --home-dir /opt/vortex vortex

USER vortex
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('VORTEX_PORT', '8000')}/healthz\", timeout=2)"]

# Off loopback the control plane needs VORTEX_TOKEN (for POST /vram/cleanup); see compose.yaml.
ENTRYPOINT ["python", "-m", "app"]
