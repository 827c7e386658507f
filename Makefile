# Two commands for a fresh machine:  `make demo` (the main job) and `make test`.
# Both create the virtualenv and install everything they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements*.txt Makefile pyproject.toml | cksum | cut -d' ' -f1)
DEMO ?= demo
JOBS ?= 2
# Debian's 68-point dlib predictor (offline landmarks); sudo only when not root.
APT_INSTALL := $(if $(filter 0,$(shell id -u)),,sudo) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$$0"'

.PHONY: setup demo test lint format bench mutate multihost clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	test -f /usr/share/dlib/shape_predictor_68_face_landmarks.dat || $(APT_INSTALL) libdlib-data
	$(PY) -m pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup
	$(PY) demo.py --out $(DEMO) --workers $(JOBS)

test: setup
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: setup
	$(PY) bench/synthetic.py

# Mutation testing (cosmic-ray) of diffusion/, masks, audio features, VQGAN losses and
# sharding, each against a fast covering test subset: survivors are printed as JSON (see
# README, "Testing"). Not part of `make test`: ~40 min on 2 cores at the default sample.
MUTANTS ?= 30
mutate: setup
	$(PY) scripts/mutate.py --per-module $(MUTANTS)

# The tiny DiT on random latents as 2 processes x 4 CPU devices through jax.distributed
# (scripts/multihost.py; logs in $(MH_WORKDIR)/process_*.log). Re-run to resume.
MH_WORKDIR ?= /tmp/dithead-multihost
multihost: setup
	test -d $(MH_WORKDIR)/latents/dataset || $(PY) tests/stage2_data.py $(MH_WORKDIR)/latents
	$(PY) scripts/multihost.py --processes 2 --devices 4 -- --config configs/dit.py:testing \
		--workdir $(MH_WORKDIR)/run --config.data.dir=$(MH_WORKDIR)/latents \
		--config.train.progress=none

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
