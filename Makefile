# Every target builds its own virtual environment from nothing: a fresh machine needs only
# Python 3.11+, pip and a C compiler.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
DEMO_STAMP := $(VENV)/.installed-demo
DOCS_STAMP := $(VENV)/.installed-docs
CC ?= cc

.PHONY: demo test matrix lint typecheck pytest coverage fuzz bench bench-quick docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# The benchmark's peers come on top of the test tools; its C floor needs a compiler.
$(BENCH_STAMP): $(STAMP)
	@command -v $(CC) >/dev/null || { echo "make bench needs a C compiler ($(CC))" >&2; exit 1; }
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

# The demo needs only the package and rich (for its table on a terminal).
$(DEMO_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

# The documentation site's tools come with the test tools (tests/test_site.py builds it too).
$(DOCS_STAMP): $(STAMP)
	touch $@

# The documentation site, into site/: any warning (a broken link or anchor, a page left out of
# the nav, a docstring mkdocstrings cannot read) fails the build.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# A leak, heavy work, a segfault and a fan-out, each in-process and isolated, in a table.
demo: $(DEMO_STAMP)
	$(BIN)/python -m aioisolate demo

test: lint typecheck pytest

# The whole suite on each supported Python (3.11, 3.12, 3.13), found on PATH or under pyenv's
# versions, each in a virtual environment of nox's (noxfile.py): one found nowhere fails the
# run. MATRIX picks some: CI runs make test on 3.11, then make matrix MATRIX="3.12 3.13".
MATRIX ?= 3.11 3.12 3.13
matrix: $(STAMP)
	$(BIN)/nox -s tests -p $(MATRIX)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest

# The suite under coverage, children included (coverage patches os._exit to save their data).
coverage: $(STAMP)
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest -q
	$(BIN)/coverage combine -q
	$(BIN)/coverage report

# A deeper fuzzing run of the frame reader and the safe decoder (FUZZ_SECONDS, default 300).
FUZZ_SECONDS ?= 300
fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet atheris
	cd tests/fuzz && ../../$(BIN)/python atheris_frames.py -max_total_time=$(FUZZ_SECONDS)

# The full benchmark, about 15 minutes on 2 cores: writes docs/performance.md and .png, and
# the raw samples to bench/results/latest.json (python -m bench --report-only redraws them).
bench: $(BENCH_STAMP)
	CC=$(CC) $(BIN)/python -m bench

# One round with tiny counts, written to a temporary file: checks that every ratio comes out,
# never how fast anything is.
bench-quick: $(BENCH_STAMP)
	@out=$$(mktemp -d) && CC=$(CC) $(BIN)/python -m bench --quick --check --out "$$out/performance.md" \
		&& echo "bench-quick: report in $$out/performance.md"

clean:
	rm -rf $(VENV) .nox site .coverage .coverage.* .mypy_cache .ruff_cache .pytest_cache bench/build bench/results
