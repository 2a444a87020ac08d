# syntax=docker/dockerfile:1
# GPU image: onnxruntime-gpu 1.31 (CUDA 13, cuDNN 9) behind FastAPI/uvicorn.
# Build:  docker build -t encoder-service .
# Run:    docker run --gpus all -p 8000:8000 -p 8001:8001 -v encoder-models:/models encoder-service
# With no bundle in ENCODER_MODEL_DIR the service converts the built-in default model into /models once
# (fp16 on a GPU); the TensorRT engine and timing caches live inside the bundle, on the same volume.

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The converter only needs PyTorch on the CPU (export + verification); the CPU wheel keeps the image small.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY converter ./converter
COPY service ./service
RUN pip install .

FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 encoder \
    && useradd --system --uid 10001 --gid encoder --home-dir /home/encoder --create-home encoder \
    && mkdir -p /models \
    && chown encoder:encoder /models
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ENCODER_HOST=0.0.0.0 \
    ENCODER_PORT=8000 \
    ENCODER_CACHE_DIR=/models
USER 10001:10001
WORKDIR /home/encoder
VOLUME ["/models"]
EXPOSE 8000 8001
# Ready only after the session is built and every batch bucket is warmed (first start converts: allow time).
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8000/readyz"]
ENTRYPOINT ["encoder-serve"]
