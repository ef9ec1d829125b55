# Newcomer entry points: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Datasets go to .data/ here: the default of every command run from this checkout
# (fmtl_lightning.data.resolve_data_dir; FMTL_DATA_DIR overrides it, for make too).

.PHONY: setup web data test demo bench bench-accuracy bench-pfllib bench-gain deploy-local setup-flower-sim lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel lies on local disk; anything unpinned pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[train,flower,dev,images]'
	touch $(STAMP)

setup: $(STAMP) data web

# The browser tests (tests/browser) run the web edge client (mobile_client/web) in Debian's
# chromium (installed as root when missing; Playwright's own browser downloads are not
# used) on onnxruntime-web, pinned by package-lock.json (npm ci).
WEB := mobile_client/web
CHROMIUM := /usr/bin/chromium
WEB_STAMP := $(WEB)/node_modules/.installed

web: $(WEB_STAMP)
	@test -x $(CHROMIUM) || { if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "make setup: no $(CHROMIUM); the browser tests need it: sudo apt-get install chromium"; fi; }

$(WEB_STAMP): $(WEB)/package.json $(WEB)/package-lock.json
	@command -v npm >/dev/null || { if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; \
	  else echo "make setup: npm is missing: sudo apt-get install nodejs npm"; exit 1; fi; }
	cd $(WEB) && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

data: $(STAMP)
	$(PY) -m fmtl_lightning.data.fetch --all

# 3 workers on 2 cores, one torch thread each: the deployment and browser tests spend much
# of their time waiting on other processes, so a third worker keeps both cores busy
# (worksteal: an idle worker takes queued tests from a busy one, so no long tail)
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 3 --dist worksteal --durations=15

demo: setup
	$(PY) -m fmtl_lightning.cli demo

bench: setup
	$(PY) -m benchmarks.run_all

# learning quality on real data: parts 1-3 (about 60 minutes on 2 cores; --quick for a few
# minutes), then PFLlib's Fashion-MNIST leaderboard protocol (about 60 more)
bench-accuracy: setup
	$(PY) -m benchmarks.accuracy
	$(PY) -m benchmarks.pfllib

# PFLlib's Fashion-MNIST leaderboard, ours next to theirs: 5 rounds per run (about 60
# minutes on 2 idle cores); `python -m benchmarks.pfllib --full` runs their 2,000 rounds
bench-pfllib: setup
	$(PY) -m benchmarks.pfllib

# the multi-task gain with 500 test images per client, 5 seeds, paired 95% CIs, the 2NN MLP
# and FedAvgCNN (about 60 minutes on 2 idle cores; --quick for a smoke run)
bench-gain: setup
	$(PY) -m benchmarks.acc_gain

# a real Flower federation on this machine: SuperLink + 3 SuperNodes over TLS
deploy-local: setup
	$(PY) -m fmtl_lightning.deploy local --config examples/flower/fmtl.yaml --out runs/flower-local

setup-flower-sim: $(STAMP)
	$(PY) -m pip install --quiet 'flwr[simulation]==1.41.0'

lint: $(STAMP)
	$(VENV)/bin/ruff check fmtl_lightning export mobile_client tests examples benchmarks
	$(VENV)/bin/ruff format --check fmtl_lightning export mobile_client tests examples benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .data
