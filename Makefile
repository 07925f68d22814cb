# flock: two commands do all the set-up on a fresh machine with python3, pip and make.
#   make demo   - create the environment, fetch the default model, start a node, stream a chat
#   make test   - create the environment and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint dist clean native kernels browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

native: $(STAMP)
	@if [ "$$(uname -s)" = "Linux" ]; then $(PY) -m agent.runtime.blas build --out agent/runtime/native || echo "warning: BLAS shim not built; runners use MLX's reference BLAS"; fi
	@if [ "$$(uname -s)" = "Linux" ]; then $(MAKE) --no-print-directory kernels || echo "warning: attention kernels not built; runners use MLX's CPU attention"; fi

# The attention kernels (an MLX C++ extension) need nanobind's sources at build time only; the
# pinned version matches the nanobind ABI MLX's own module was built with.
kernels: $(STAMP)
	@[ -f build/nanobind/nanobind/src/nb_combined.cpp ] || $(PY) -m pip install -q --target build/nanobind nanobind==3.1.0
	@ls agent/runtime/native/_flockattn-*.so >/dev/null 2>&1 && [ -z "$$(find agent/runtime/native/flockattn.cpp agent/runtime/native/flockattn.h agent/runtime/native/flockthreads.cpp agent/runtime/native/flockkv.cpp agent/runtime/native/flockdecode.cpp agent/runtime/native/flockops.cpp agent/runtime/native/flockdense.cpp agent/runtime/native/flocklayer.cpp agent/runtime/native/flockmoe.cpp -newer "$$(ls -t agent/runtime/native/_flockattn-*.so | head -1)")" ] || $(PY) -m agent.runtime.kernels build --out agent/runtime/native --nanobind build/nanobind/nanobind

demo: native
	$(PY) -m agent demo

# The dashboard's browser tests need Chromium, the doctor's tests libfaketime and iptables: as
# root, installed from Debian's packages when missing; if that fails those tests skip, saying why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "browser tests will skip: Chromium missing and cannot install it (needs root and apt-get)"; \
	else DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver libfaketime iptables >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver libfaketime iptables >/dev/null 2>&1) \
	  || echo "browser tests will skip: apt-get install chromium chromium-driver failed"; fi

test: native browser
	$(PY) -m pytest -q --durations=30 tests; code=$$?; if [ $$code -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$code

test-fast: native
	$(PY) -m pytest -q -m "not slow and not netns" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check agent tests bench deploy

# The builder lives outside the runtime package (deploy/), so it runs from the tree's root.
dist: native
	$(PY) -m deploy.zipapp --out dist

clean:
	rm -rf dist build *.egg-info agent/runtime/native/*.so
