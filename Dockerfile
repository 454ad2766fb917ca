# One image for the Python services (worker, gateway, analytics, topic set-up); the broker is apache/kafka.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TOKENRELAY_CACHE_DIR=/var/cache/tokenrelay \
    TOKENRELAY_GATEWAY_HOST=0.0.0.0 \
    TOKENRELAY_WORKER_METRICS_HOST=0.0.0.0

WORKDIR /app
# CPU torch first, from its own index: the default PyPI wheel pulls in several GB of CUDA libraries.
# For a GPU image pass a CUDA wheel index, e.g. --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (the compose `gpu` profile does); the code picks cuda with bf16 at start when torch sees a GPU.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install torch --index-url "${TORCH_INDEX}"
# Optional extras, e.g. --build-arg EXTRAS='[tracing]' for OpenTelemetry traces (on when OTEL_* asks for them), or
# EXTRAS='[vllm]' for the vLLM engine on a GPU (the compose `vllm` profile);
# vLLM then installs the torch it pins (PyPI's CUDA build: give TORCH_INDEX=https://pypi.org/simple with it).
ARG EXTRAS=

COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY services ./services
COPY workers ./workers
COPY gateway ./gateway
RUN pip install ".${EXTRAS}" && useradd --create-home --uid 10001 tokenrelay \
    && mkdir -p /var/cache/tokenrelay && chown tokenrelay /var/cache/tokenrelay
USER tokenrelay

EXPOSE 8080 6066 9400
ENTRYPOINT ["tokenrelay"]
CMD ["--help"]
