# The two commands of the README. Each creates and fills its own virtual environment in .venv:
# `make demo` installs the core dependencies only; `make test` adds torch, torch-em, dask.distributed,
# neuroglancer, the documentation tools, the test tools and what the benchmarks compare against. The browser test also needs
# Debian's chromium and chromium-driver: `make test` installs them when run as root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-core docs venv clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: $(VENV)/.core
	# torch and torchvision as a matching pair (torch-em needs torchvision); pip finds them on disk here.
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[torch,test,distributed,viewer,docs]"
	touch $@

venv: $(VENV)/.installed

# The main job: write a BossDB-layout mirror, serve it on 127.0.0.1 and read p105_psd through the catalog.
demo: $(VENV)/.core
	$(PY) -m wildenberg_intake.cli.demo

test: $(VENV)/.installed
	@# The browser test's Debian packages: installed here where we may (root); otherwise those
	@# tests are skipped with the command that installs them (CI, which runs as root, fails instead).
	@if ! [ -x /usr/bin/chromium ] || ! [ -x /usr/bin/chromedriver ]; then \
	    if [ "$$(id -u)" = 0 ]; then \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	    else \
	        echo "the browser test needs Debian's chromium and chromium-driver: sudo apt-get install chromium chromium-driver"; \
	    fi; \
	fi
	$(PY) -m pytest -q

# The core suite on a second Python (CI's second leg): every test but those of the torch,
# dask.distributed and viewer extras (torch lies on this machine's disk for Python 3.11 only).
# PYTHON_CORE: that Python; by default 3.13, from PATH or pyenv.
PYTHON_CORE ?= $(shell command -v python3.13 >/dev/null 2>&1 && python3.13 -c '' 2>/dev/null && echo python3.13 || \
                 echo "$$(pyenv prefix 3.13 2>/dev/null)/bin/python3.13")
CORE_VENV := .venv-core

$(CORE_VENV)/.installed: pyproject.toml
	$(PYTHON_CORE) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CORE_VENV)/bin/python -m pip install --quiet -e ".[test,docs]"
	touch $@

test-core: $(CORE_VENV)/.installed
	$(CORE_VENV)/bin/python --version
	$(CORE_VENV)/bin/python -m pytest -q -m "not torch and not distributed and not viewer" \
	    --ignore=tests/test_training.py --ignore=tests/test_lazy_training.py --ignore=tests/test_foreground.py \
	    --ignore=tests/test_dask.py --ignore=tests/test_view.py

# The documentation site, from docs/ and the docstrings, into site/ (open site/index.html).
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) $(CORE_VENV) site
