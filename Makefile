# Two commands do everything on a fresh clone:
#   make demo   create .venv, install vb_batch (CPU torch pinned), run the demo job into out/
#   make test   create .venv, install vb_batch with every engine and test extra, run the whole suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel: an unpinned torch would pull several GB of CUDA packages.
TORCH := torch==2.13.0
EXTRAS_TEST := test,ray,spark,lake,s3,hosted

.PHONY: demo test venv venv-test browser clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS_TEST)]'
	touch $@

venv: $(VENV)/.installed

venv-test: $(VENV)/.installed-test

demo: venv
	$(BIN)/vb-batch demo --out out

test: venv-test browser
	$(BIN)/python -m pytest -q

# The report test opens the HTML report in Debian's headless Chromium.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium is missing and cannot be installed here: apt-get install chromium"

clean:
	rm -rf $(VENV) out demo_data .pytest_cache .hypothesis
