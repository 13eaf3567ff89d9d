# perceptclip: one image for the scoring and training jobs, Ray head and GPU workers alike.
# The CUDA runtime comes with the pinned torch wheels; run it with the NVIDIA container runtime.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 procps \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/perceptclip
COPY pyproject.toml requirements.lock README.md ./
COPY scripts/ scripts/
COPY pipeline/ pipeline/
COPY configs/ configs/
COPY jobs/ jobs/
RUN bash scripts/setup.sh && rm -rf /root/.cache/pip

# `ray start` (KubeRay head and workers) and `perceptclip` both come from the virtual environment.
ENV PATH=/opt/perceptclip/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1
ENTRYPOINT []
CMD ["perceptclip", "--help"]
