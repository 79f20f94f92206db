# Two commands set everything up on a fresh Debian/Ubuntu machine:
#   make run    virtualenv + muxd, then the built-in demo (a simulated device)
#   make test   system packages the tests use (apt-get, when root), lint, the suite

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# Debian packages the test suite drives as real peers: chromium (web console),
# promtool (metrics lint), systemd tools (socket activation, unit checks), the
# .deb toolchain, and libsystemd-dev/pkg-config to build systemd-python.
SYSTEM_PACKAGES := chromium prometheus systemd dpkg-dev debhelper dh-python \
	pybuild-plugin-pyproject python3-all python3-setuptools lintian \
	libsystemd-dev pkg-config netcat-openbsd
SYSTEM_COMMANDS := chromium promtool systemd-socket-activate systemd-analyze \
	dpkg-buildpackage dh_python3 lintian pkg-config nc

.PHONY: run demo test lint system-deps venv bench bench-deps bench-smoke deb clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@# systemd-python needs libsystemd-dev to build; muxd works without it.
	-pkg-config --exists libsystemd 2>/dev/null && $(BIN)/pip install -q -e '.[systemd]'
	touch $@

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/muxd demo

demo: run

system-deps:
	@missing=""; for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	echo "missing:$$missing"; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); \
	else \
		echo "not root: install them with: sudo apt-get install $(SYSTEM_PACKAGES)"; \
		echo "(tests that need them are skipped with a reason)"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check muxd tests bench
	$(BIN)/ruff format --check muxd tests bench
	$(BIN)/mypy

test: system-deps $(STAMP)
	@# system-deps may have just brought libsystemd-dev: pick up systemd-python now.
	-pkg-config --exists libsystemd 2>/dev/null && $(BIN)/python -c 'import systemd' 2>/dev/null \
		|| $(BIN)/pip install -q -e '.[systemd]'
	$(MAKE) lint
	$(BIN)/pytest -q

# The peer comparison needs ser2net (Debian) and ser2tcp + matplotlib (PyPI).
# They stay out of the dev venv: a venv of their own, with muxd installed
# editable for its dependencies (the harness runs muxd from the working tree).
BENCH_VENV ?= .venv-bench
BENCH_OUT  ?= bench/results.jsonl

bench-deps:
	@command -v ser2net >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ser2net; \
		else echo "ser2net missing: sudo apt-get install ser2net"; exit 1; fi; }
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q -e . ser2tcp matplotlib

# About 8 minutes on 2 cores; writes docs/benchmarks.md and docs/img/*.png.
bench: bench-deps
	rm -f $(BENCH_OUT)
	$(BENCH_VENV)/bin/python -m bench.fanout --all --out $(BENCH_OUT)
	$(BENCH_VENV)/bin/python -m bench.report $(BENCH_OUT)
	$(BENCH_VENV)/bin/python -m bench.memory

# The 10-second smoke run that `make test` also runs.
bench-smoke: $(STAMP)
	$(BIN)/pytest -q tests/test_bench_smoke.py

# A .deb of the working tree (packaging/debian), into dist/.
deb:
	packaging/build-deb.sh dist

clean:
	rm -rf $(VENV) $(BENCH_VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
