# Two commands set everything up on a fresh Debian/Ubuntu machine:
#   make run    virtualenv + muxd and its runtime dependencies, then the built-in
#               demo (a simulated device); DEMO_ARGS="--tcp 7100 --http 8120" moves it
#   make test   system packages the tests use (apt-get, when root), the [test]
#               extra into the same venv, lint, the suite

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# One venv, two stamps: `make run` installs the runtime only (RUN_STAMP); `make
# test` adds the test toolchain on top (STAMP) without reinstalling the rest.
RUN_STAMP := $(VENV)/.run-stamp
STAMP     := $(VENV)/.installed-stamp
DEMO_ARGS ?=

# Debian packages the test suite drives as real peers: chromium (web console),
# promtool (metrics lint), systemd tools (socket activation, unit checks), the
# .deb toolchain, libsystemd-dev/pkg-config to build systemd-python,
# openssl (s_client reads a TLS listener), mosquitto (the MQTT bridge's
# broker in tests/test_mqtt.py and bench/mqtt.py), and systemd-container +
# mmdebstrap (tests/test_systemd_real.py boots the .deb under a real systemd),
# ser2net (tests/test_ser2net.py converts its shipped /etc/ser2net.yaml and examples),
# picocom (tests/test_sharing.py: the escape commands from a terminal program on a pty).
SYSTEM_PACKAGES := chromium prometheus systemd dpkg-dev debhelper dh-python \
	pybuild-plugin-pyproject python3-all python3-setuptools lintian \
	libsystemd-dev pkg-config netcat-openbsd openssl mosquitto \
	systemd-container mmdebstrap picocom ser2net
SYSTEM_COMMANDS := chromium promtool systemd-socket-activate systemd-analyze \
	dpkg-buildpackage dh_python3 lintian pkg-config nc openssl mosquitto \
	systemd-nspawn mmdebstrap ser2net picocom

.PHONY: run demo test lint system-deps venv bench bench-deps bench-smoke deb clean

$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# Editable installs of a pyproject-only package need pip >= 21.3; upgrade only an older one.
	$(BIN)/python -c 'import pip, sys; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (21, 3))' \
		|| $(BIN)/pip install -q --upgrade pip
	@# Runtime dependencies only. systemd-python needs libsystemd-dev (and a compiler) to
	@# build; muxd works without it, so a failed build falls back to the plain install.
	if pkg-config --exists libsystemd 2>/dev/null; then \
		$(BIN)/pip install -q -e '.[systemd]' || $(BIN)/pip install -q -e .; \
	else $(BIN)/pip install -q -e .; fi
	touch $@

$(STAMP): $(RUN_STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/muxd demo $(DEMO_ARGS)

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

# labgrid, the lab framework whose exporter starts `ser2net` (tests/test_ser2net.py runs
# its client, tests/labgrid_client.py, here). A venv of its own: labgrid brings
# pyserial-labgrid, which installs over pyserial's `serial` package, and the rest of
# the suite tests muxd against pyserial itself. Pinned to the version whose exporter
# command lines the tests replay.
LABGRID_VENV  := .venv-labgrid
LABGRID_STAMP := $(LABGRID_VENV)/.installed-stamp

$(LABGRID_STAMP):
	test -x $(LABGRID_VENV)/bin/python || $(PYTHON) -m venv $(LABGRID_VENV)
	$(LABGRID_VENV)/bin/pip install -q 'labgrid==26.0.1'
	touch $@

test: system-deps $(STAMP) $(LABGRID_STAMP)
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
# bench.rack's lines (docs/benchmarks.md, section rack, quotes them by hand).
RACK_OUT   ?= bench/results-rack.jsonl

bench-deps:
	@command -v ser2net >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ser2net; \
		else echo "ser2net missing: sudo apt-get install ser2net"; exit 1; fi; }
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q -e . ser2tcp matplotlib

# About 10 minutes on 2 cores; writes docs/benchmarks.md and docs/img/*.png.
bench: bench-deps
	rm -f $(BENCH_OUT) $(RACK_OUT)
	$(BENCH_VENV)/bin/python -m bench.fanout --all --out $(BENCH_OUT)
	$(BENCH_VENV)/bin/python -m bench.report $(BENCH_OUT)
	$(BENCH_VENV)/bin/python -m bench.memory
	@# A rack: 128 boards x 4 readers at 115200 baud, a jsonl trace each, muxd then ser2net.
	$(BENCH_VENV)/bin/python -m bench.rack --ports 128 --readers 4 --trace jsonl --seconds 10 --out $(RACK_OUT)
	$(BENCH_VENV)/bin/python -m bench.rack --ports 128 --readers 4 --seconds 10 --out $(RACK_OUT)
	$(BENCH_VENV)/bin/python -m bench.rack --ports 128 --idle --seconds 10 --out $(RACK_OUT)
	$(BENCH_VENV)/bin/python -m bench.rack --ports 128 --startup --out $(RACK_OUT)

# The 10-second smoke run that `make test` also runs.
bench-smoke: $(STAMP)
	$(BIN)/pytest -q tests/test_bench_smoke.py

# The fuzzers of tests/test_fuzz_*.py at full size: 10^6 inputs each (hours;
# `make test` runs them at 200 each). Override with FUZZ_EXAMPLES=N. No
# per-test timeout here, and the pytest cache stays out of the tree.
FUZZ_EXAMPLES ?= 1000000
.PHONY: fuzz
fuzz: $(STAMP)
	MUXD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q tests/test_fuzz_*.py -p no:cacheprovider --timeout=0

# A .deb of the working tree (packaging/debian), into dist/.
deb:
	packaging/build-deb.sh dist

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(LABGRID_VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
