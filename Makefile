# Entry points for people and CI: `make demo`, `make gui`, `make test`, `make test-all`, `make test-cluster`, `make clean`.
# Everything runs from .venv, which is (re)built from the requirements files.

PYTHON ?= python3
VENV := .venv
# Touched after a successful install; older than a requirements file means reinstall.
STAMP := $(VENV)/.requirements.stamp
PORT ?= 4000

.PHONY: demo gui test test-all test-cluster lint bench bench-forward bench-web bench-cluster bench-heads bench-compare bench-fleet clean debian-deps

# One venv for demo and tests: requirements-dev.txt includes requirements.txt.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# Relay and server on 127.0.0.1:$(PORT) until Ctrl+C; state in demo/.
demo: $(STAMP)
	$(VENV)/bin/python -m ptth_lib.tools.demo --port $(PORT)

# The desktop app for people who connect (README, "For the people who connect"); its settings live in
# ~/.config/ptth/ptth_client.toml unless GUI_ARGS="--config FILE" says otherwise.
gui: $(STAMP)
	$(VENV)/bin/python ptth_client_gui.py $(GUI_ARGS)

# Debian programs the tests call, as command:package (sshd by its path: /usr/sbin is not
# always on PATH). Installed only when missing, and only as root (CI is root).
DEBIAN_TOOLS := curl:curl wget:wget ssh:openssh-client /usr/sbin/sshd:openssh-server /usr/sbin/nginx:nginx \
  chromium:chromium redis-server:redis-server Xvfb:xvfb xdotool:xdotool xclip:xclip
debian-deps:
	@missing=""; for t in $(DEBIAN_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	  else \
	    echo "make: the tests need$$missing; install (sudo apt-get install$$missing) and run make again" >&2; exit 1; \
	  fi; \
	fi

# ruff over everything, mypy --strict over ptth_lib (settings in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check --quiet .
	$(VENV)/bin/mypy

# pytest-xdist workers for `make test`: the tests mostly wait on sockets and timeouts, so four
# share 2 cores well; tests marked `alone` still run with nothing beside them (tests/conftest.py).
# --dist loadfile keeps each file in one worker, so its module-scoped processes start once.
# PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 4

# The wheels of requirements.txt: tests/e2e/test_install.py installs PTTH's own wheel into a new venv
# from these alone, so that no test reaches the network (pip's cache makes this a few seconds).
WHEELHOUSE := $(VENV)/wheelhouse
$(WHEELHOUSE)/.stamp: $(STAMP)
	$(VENV)/bin/python -m pip wheel --quiet --disable-pip-version-check -r requirements.txt -w $(WHEELHOUSE)
	touch $@

# pytest exits 5 when it collected no test; say so, since a silent exit 5 looks like a crash.
test: $(STAMP) $(WHEELHOUSE)/.stamp debian-deps lint
	@$(VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests: that is a failure" >&2; fi; \
	  exit $$rc

# Also the soak/load runs marked slow (the last -m given to pytest wins over addopts).
test-all: PYTEST_ARGS += -m ""
test-all: test

# The end-to-end suite again with every relay run as a cluster on Redis: 4 gunicorn workers on one
# port, then two hosts of 2 workers behind nginx doing round robin (tests/e2e/relay_modes.py;
# about 6 minutes each). The cluster's own tests and the QUIC relay (one process) are in `make test`.
CLUSTER_RUN = $(VENV)/bin/python -m pytest -n 2 --dist loadfile tests/e2e \
	--ignore-glob='tests/e2e/test_cluster_*' --ignore-glob='tests/e2e/test_quic_*' $(PYTEST_ARGS)
test-cluster: $(STAMP) debian-deps
	PTTH_TEST_RELAY=workers $(CLUSTER_RUN)
	PTTH_TEST_RELAY=hosts $(CLUSTER_RUN)

# The benchmark suite (minutes; never part of `make test`): tunnel against direct
# serving and nginx, side by side. It installs nginx and wrk when missing.
# BENCH_ARGS="--quick" for a smoke run; results in bench/results.json.
bench: $(STAMP)
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

# TCP port forwarding over HTTP and QUIC: round trip and bulk vs direct TCP (about 2.5 minutes).
bench-forward: $(STAMP)
	$(VENV)/bin/python bench/forward.py $(BENCH_ARGS)

# A web app through the tunnel against direct: 1 GiB upload, WebSocket echo and idle sockets, SSE (about 5 minutes; 6 with --profile).
bench-web: $(STAMP)
	$(VENV)/bin/python bench/web.py $(BENCH_ARGS)

# The relay as a cluster on a real redis-server: CPU per request for single-process and 1, 2, 4 workers,
# bulk across two hosts, the projection to N cores (about 3 minutes on a quiet machine; needs redis-server).
bench-cluster: $(STAMP)
	$(VENV)/bin/python bench/cluster.py $(BENCH_ARGS)

# A fleet of idle servers at one relay, N = 0, 1,000, 5,000 and 10,000 side by side: relay RSS per parked
# listen and per connection, CPU per second while idle, a probe server's p50/p99 (about 12 minutes).
bench-fleet: $(STAMP)
	$(VENV)/bin/python bench/fleet.py $(BENCH_ARGS)

# Two revisions and direct serving side by side: a small request's CPU and time at concurrency 1 and 32,
# and bulk: BENCH_ARGS="--rev OLD" (about 3 minutes).
bench-compare: $(STAMP)
	$(VENV)/bin/python bench/compare.py $(BENCH_ARGS)

# What a large request head costs the relay, with gunicorn's C parser and its Python one (a minute).
bench-heads: $(STAMP)
	$(VENV)/bin/python bench/heads.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo
