# Two commands set everything up on a fresh machine:  make demo  |  make test
# Both create .venv (Python 3.11) and install the pinned dependencies once; the install is
# skipped while a stamp keyed by the requirement files (and pyproject.toml) exists.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
REQS := requirements/torch.txt requirements/base.txt requirements/detectron2.txt pyproject.toml
STAMP := $(VENV)/.installed-$(shell cat $(REQS) | sha256sum | cut -c1-16)
PYTEST_ARGS ?=
# Test workers (pytest-xdist): one per core by default; each runs torch on one thread.
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

DEMO_DIR ?= output/demo

.PHONY: install test lab-test lint demo clean

install: $(STAMP)

$(STAMP): $(REQS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements/torch.txt -r requirements/base.txt
	# detectron2's pure-Python code: the cp310 wheel unpacked into this venv, hash-checked;
	# its compiled _C is for another torch and Python and is never loaded, and its top-level
	# 'tools' package would shadow ours.
	$(PIP) install --no-deps --only-binary=:all: --python-version 3.10 --upgrade \
		--target "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
		--require-hashes -r requirements/detectron2.txt
	cd "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" && \
		rm -rf tools detectron2/_C*.so
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PY) -c "import detectron2, gn_det; print('detectron2', detectron2.__version__, 'gn_det', gn_det.__version__)"
	rm -f $(VENV)/.installed-*
	touch $@

# The plugin's tests and the lab's quick ones; the lab's study tools run end to end (marker
# "study") only in lab-test, which a change under lab/tools or lab/gn_det_lab runs before it lands.
test: $(STAMP)
	$(PYTEST) -m "not study" $(PYTEST_ARGS)

lab-test: $(STAMP)
	$(PYTEST) -m study $(PYTEST_ARGS)

# ruff (pinned in requirements/base.txt) with the settings of pyproject.toml.
lint: $(STAMP)
	$(PY) -m ruff check .

# The main job: GN Mask R-CNN (R-18-FPN) trained from scratch on the embedded shapes dataset,
# CPU, 2 images per batch (configs/shapes/gn_demo.yaml), then COCO evaluation on the held-out
# shapes_test split; prints box AP and mask AP, and draws what it
# made: predictions beside ground truth ($(DEMO_DIR)/visualize/*.png) and its training curves
# ($(DEMO_DIR)/metrics.png). A rerun replaces the demo's own outputs.
demo: $(STAMP)
	$(PY) tools/train_net.py --config shapes/gn_demo.yaml OUTPUT_DIR $(DEMO_DIR)
	$(PY) tools/visualize.py --weights $(DEMO_DIR)/model_final.pth --dataset shapes_test --num-images 4 --force
	$(PY) lab/tools/plot_metrics.py $(DEMO_DIR) --labels "GN (make demo)" --output $(DEMO_DIR)/metrics.png --force
	$(PY) lab/tools/print_results.py $(DEMO_DIR)

clean:
	rm -rf $(VENV) .pytest_cache
