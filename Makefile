# Keel: `make run` serves the model, `make test` runs every test. Both set up what they need first.
SHELL := /bin/bash
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup model run test lint unit bench clean

setup:
	@bash infra/bootstrap.sh

model: setup
	@.venv/bin/keel model prepare

run: setup
	@.venv/bin/keel up

lint: setup
	.venv/bin/ruff check .

test: model
	@bash infra/setup-browser.sh
	@bash infra/setup-testdata.sh
	.venv/bin/ruff check .
	.venv/bin/pytest

unit: setup
	.venv/bin/pytest -m "not integration"

bench: model
	.venv/bin/python bench/serving.py

clean:
	rm -rf .venv .venv-vllm .keel
