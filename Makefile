# cldist: `make run` trains the default stream, `make test` runs the whole test suite (what CI
# runs), `make test-fast` the unit tests not marked slow (the edit-test loop, ~1 min on 2 idle
# cores). Both create .venv when missing and install the tested pins from constraints.txt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cldist-installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: run test test-fast install data-deps clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The default stream reads the real Fashion-MNIST files that Debian's dataset-fashion-mnist
# package installs; install it when we may, otherwise say how.
data-deps:
	@if [ -d $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)); \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', or put the"; \
	  echo "four idx files in a directory and run 'make run ARGS=scenario.root=DIR'"; exit 2; \
	fi

run: $(STAMP) data-deps
	$(BIN)/cldist run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit -m "not slow" $(PYTEST_ARGS)

clean-runs:
	rm -rf runs
