# HAT: the two commands of the quick start are `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
PLUGINS := plugins/hat-coco plugins/hat-fcos plugins/hat-bpu plugins/hat-onnx
STAMP   := $(VENV)/.hat-installed

.PHONY: setup browser demo test lint wheels clean

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml plugins/*/pyproject.toml plugins/hat-bpu/setup.py plugins/hat-bpu/hat_bpu/_native.c \
		tests/plugin_toy/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,plots,tb]" $(addprefix -e ,$(PLUGINS)) \
		scikit-image pytest-xdist
	$(BIN)/pip install -q --disable-pip-version-check -e tests/plugin_toy
	touch $(STAMP)

setup: $(STAMP) browser

# headless Chromium for the report's browser test (tests/test_report_browser.py): the Debian
# package when absent and we may install it; else the test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } || \
	  echo "note: chromium is not installed and cannot be here; the report's browser test will skip"

demo: $(STAMP)
	$(BIN)/hat run recipes/demo.toml

test: $(STAMP)
	$(BIN)/ruff check hatcore plugins tests bench
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check hatcore plugins tests bench
	$(BIN)/mypy hatcore

wheels: $(STAMP)
	rm -rf dist && mkdir -p dist
	$(BIN)/python -m build --wheel --no-isolation --outdir dist .
	for p in $(PLUGINS); do $(BIN)/python -m build --wheel --no-isolation --outdir dist $$p; done

clean:
	rm -rf $(VENV) dist build runs *.egg-info
