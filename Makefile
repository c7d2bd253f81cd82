# The two commands that matter: `make demo` and `make test`. Both install what they need.
PY      := .venv/bin/python
APT_PKGS := iproute2 etcd-server etcd-client containernetworking-plugins iperf3 iptables socat \
            tcpdump tshark procps util-linux kmod iputils-ping ethtool systemd
STAMP   := .venv/.installed

.PHONY: setup demo test lint format clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if [ "$$(id -u)" != 0 ]; then echo "make setup: run as root (it installs Debian packages and creates network namespaces)"; exit 1; fi
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS)
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

demo: setup
	$(PY) -m overlay.demo

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

test: setup lint
	.venv/bin/pytest -q -ra

# The benchmark matrix (several minutes); results in bench/results/<date-time>.{md,json,png}.
bench: setup
	$(PY) -m overlay bench

clean:
	rm -rf .venv *.egg-info .pytest_cache .mypy_cache .hypothesis
