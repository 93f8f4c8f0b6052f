# The two commands of the README. Each creates and fills its own virtual environment in .venv:
# `make demo` installs the core dependencies only; `make test` adds torch, torch-em, dask.distributed,
# neuroglancer, the documentation tools, the test tools and what the benchmarks compare against. The browser test also needs
# Debian's chromium and chromium-driver: `make test` installs them when run as root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test docs venv clean

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

# The documentation site, from docs/ and the docstrings, into site/ (open site/index.html).
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) site
