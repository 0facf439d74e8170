# sttun — the README's commands.  Every target does its own set-up on a fresh Debian
# machine (run as root): system packages with apt, a virtualenv in .venv, the package.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := iproute2 nftables ethtool tcpdump tshark iperf3 iputils-ping procps kmod \
	openvswitch-switch
SRC_DEPS := pyproject.toml

.PHONY: demo test lint bench bench-quick soak fuzz setup sysdeps clean

demo: setup
	@$(BIN)/sttun demo

test: setup lint
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	@$(BIN)/ruff check src tests bench fuzz
	@$(BIN)/ruff format --check src tests bench fuzz
	@$(BIN)/mypy

bench: setup
	$(BIN)/python bench/micro.py
	$(BIN)/python bench/offline.py
	$(BIN)/python bench/throughput.py

bench-quick: setup
	$(BIN)/python bench/micro.py --quick
	$(BIN)/python bench/offline.py --quick
	$(BIN)/python bench/throughput.py --quick

soak: setup
	$(BIN)/python -m pytest -q -m slow

fuzz: setup
	$(BIN)/python fuzz/run.py

setup: sysdeps $(VENV)/.stamp-install

# apt only when something is missing; quiet otherwise.
sysdeps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections 2>/dev/null || true; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.stamp-install: $(SRC_DEPS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@set -o pipefail; $(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,ovs]' 2>&1 | { grep -v '^WARNING: Location' || true; }
	@touch $@

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
