# The two commands of the README. Each creates and fills its own virtual environment in .venv:
# `make demo` installs the core dependencies only; `make test` adds torch, torch-em, dask.distributed,
# neuroglancer, the test tools and what the benchmarks compare against. The browser test also needs
# Debian's chromium and chromium-driver (`.ci/run` installs them when run as root).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: $(VENV)/.core
	# torch and torchvision as a matching pair (torch-em needs torchvision); pip finds them on disk here.
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[torch,test,distributed,viewer]"
	touch $@

venv: $(VENV)/.installed

# The main job: write a BossDB-layout mirror, serve it on 127.0.0.1 and read p105_psd through the catalog.
demo: $(VENV)/.core
	$(PY) -m wildenberg_intake.cli.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
