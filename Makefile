# flock: two commands do all the set-up on a fresh machine with python3, pip and make.
#   make demo   - create the environment, fetch the default model, start a node, stream a chat
#   make test   - create the environment and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint dist clean native

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

native: $(STAMP)
	@if [ "$$(uname -s)" = "Linux" ]; then $(PY) -m agent.runtime.blas build --out agent/runtime/native || echo "warning: BLAS shim not built; runners use MLX's reference BLAS"; fi

demo: native
	$(PY) -m agent demo

test: native
	$(PY) -m pytest -q tests; code=$$?; if [ $$code -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$code

test-fast: native
	$(PY) -m pytest -q -m "not slow and not netns" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check agent tests bench deploy

# The builder lives outside the runtime package (deploy/), so it runs from the tree's root.
dist: native
	$(PY) -m deploy.zipapp --out dist

clean:
	rm -rf dist build *.egg-info agent/runtime/native/*.so
