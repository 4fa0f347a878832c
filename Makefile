# Two commands do everything on a fresh clone:
#   make demo   create .venv, install vb_batch (CPU torch pinned), run the demo job into out/
#   make test   create .venv, install vb_batch with every engine and test extra, run the whole suite
#               (CI runs exactly this); it prints the 30 slowest tests at the end and keeps every
#               test's time in $(TEST_RESULTS)
#   make test-fast  the same suite without the tests marked slow, stopping at the first failure:
#               for iteration, under 3 minutes on 2 cores
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel: an unpinned torch would pull several GB of CUDA packages.
TORCH := torch==2.13.0
EXTRAS_TEST := test,ray,spark,lake,s3,hosted,schedulers
TEST_RESULTS := .cache/test-results.xml

.PHONY: demo test test-fast venv venv-test browser clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml setup.py vb_batch/codecs/_kernels.c
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
	$(BIN)/python -m pytest -q --durations=30 --junitxml=$(TEST_RESULTS)

# A test is marked slow (`@pytest.mark.slow`) when it takes more than ~1.5 s on 2 busy cores: engines,
# models, kill loops, lease watches, retries with backoff. `make test`'s durations list says which.
test-fast: venv-test
	$(BIN)/python -m pytest -q -x -p no:cacheprovider -m "not slow" --durations=10

# The report test opens the HTML report in Debian's headless Chromium.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium is missing and cannot be installed here: apt-get install chromium"

clean:
	rm -rf $(VENV) out demo_data .pytest_cache .hypothesis $(TEST_RESULTS)
