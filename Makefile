# Two commands on a fresh machine: `make demo` and `make test`. Each creates or refreshes .venv first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# Debian's prometheus package (prometheus + promtool) unpacked here, not installed: the monitor tests run them
PROM := .tools/prometheus/usr/bin

# ruff, then the layer contracts in pyproject.toml ([tool.importlinter]; no cache folder left behind), then the type
# checker on peer/, coordinator/ and monitor/ ([tool.basedpyright]; it keeps no cache, every run is a full check)
LINT = $(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports --no-cache \
	&& $(VENV)/bin/basedpyright

# Debian packages the tests use, installed with apt-get when missing (as root; without them those tests skip, saying
# so): podman, runc and debootstrap (and podman's network helpers) for the image test
# (tests/docker/test_volunteer_image.py), which builds the Dockerfile and runs its containers; iptables, which
# netavark runs to set up container networks but does not depend on (without it: "netavark: No such file or
# directory"); nftables for the NAT router of the namespace tests (tests/netns.py); chromium for the live page test
# (tests/coordinator/test_page.py).
TEST_TOOLS := podman runc debootstrap netavark aardvark-dns iptables nftables chromium

.PHONY: demo test bench lint format clean test-tools

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

$(PROM)/promtool:
	mkdir -p .tools/prometheus
	cd .tools/prometheus && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; }
	cd .tools/prometheus && dpkg -x prometheus_*.deb . && rm prometheus_*.deb
	$@ --version >/dev/null

test-tools:
	@missing=$$(for p in $(TEST_TOOLS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq $$missing >/dev/null || { apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; }; \
	fi

demo: $(STAMP)
	$(VENV)/bin/vitpeer demo

# lint, then the installed wheel (.ci/wheel-check: a new venv outside the checkout, about 10 s), then the suite
test: $(STAMP) $(PROM)/promtool test-tools
	$(LINT)
	PYTHON=$(PYTHON) .ci/wheel-check
	$(VENV)/bin/python -m pytest -m "not gpu" --durations=30

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks.run

lint: $(STAMP)
	$(LINT)

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .tools outputs .pytest_cache .ruff_cache
