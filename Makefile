# The two commands that matter: `make demo` and `make test`. Both install what they need.
PY      := .venv/bin/python
APT_PKGS := iproute2 etcd-server etcd-client containernetworking-plugins iperf3 iptables nftables \
            tcpdump tshark procps util-linux kmod iputils-ping ethtool systemd graphviz
STAMP   := .venv/.installed

# The native codecs under sanitizers: `make asan` (gcc ASan + UBSan, the codec tests) and
# `make fuzz` (clang + libFuzzer through atheris, every entry point, FUZZ_SECONDS).
NATIVE_TESTS := tests/encap/test_native.py tests/encap/test_rx.py tests/encap/test_tso.py \
                tests/encap/test_tso6.py \
                tests/overlay/dataplane/test_fastpath.py tests/overlay/dataplane/test_ipv6.py \
                tests/overlay/dataplane/test_busy_poll.py \
                tests/overlay/dataplane/test_ipv6_drains.py
# -fno-wrapv: CPython's own CFLAGS (sysconfig) carry -fwrapv, which defines signed
# overflow and so switches UBSan's signed-integer-overflow check off.
SANITIZE := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g \
            -fno-wrapv
FUZZ_PKGS := clang libclang-rt-14-dev
FUZZ_SECONDS ?= 60

.PHONY: setup demo test lint format clean bench asan fuzz

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard encap/csrc/*.c encap/csrc/*.h)
	@if [ "$$(id -u)" != 0 ]; then echo "make setup: run as root (it installs Debian packages and creates network namespaces)"; exit 1; fi
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS)
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

demo: setup
	$(PY) -m bench.demo

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

test: setup lint
	.venv/bin/pytest -q -ra

# encap._native built with ASan + UBSan into build/asan and the codec tests run against it
# (encap.native loads the file OVERLAY_NATIVE_LIB names). The interpreter is not
# instrumented, so libasan is preloaded; PYTHONMALLOC=malloc gives every bytearray ASan's
# red zones.
ASAN_ENV = LD_PRELOAD=$$(gcc -print-file-name=libasan.so) PYTHONMALLOC=malloc \
           ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
           OVERLAY_NATIVE_LIB=$$(ls $(CURDIR)/build/asan/encap/_native*.so)
asan: setup
	rm -rf build/asan
	CFLAGS="$(SANITIZE)" LDFLAGS="$(SANITIZE)" $(PY) setup.py -q build_ext \
	    --build-lib build/asan --build-temp build/asan/tmp 2>&1 | grep -v _BetaConfiguration || true
	env $(ASAN_ENV) $(PY) -c 'import encap.native as n; assert "/build/asan/" in n.module().__file__'
	env $(ASAN_ENV) .venv/bin/pytest -q -p no:cacheprovider -m "not netns" $(NATIVE_TESTS)

# tests/encap/fuzz_native.py under atheris against a clang build with -fsanitize=fuzzer-no-link
# (the C branches guide the inputs), ASan and UBSan; each input is also checked against
# the pure-Python reference. An input that fails is written to build/fuzz/crash-*.
fuzz: setup
	@command -v clang >/dev/null && ls /usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.asan-x86_64.a >/dev/null 2>&1 \
	    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(FUZZ_PKGS)
	rm -rf build/fuzz && mkdir -p build/fuzz/corpus
	CC=clang LDSHARED="clang -shared" CFLAGS="-fsanitize=fuzzer-no-link,address,undefined -fno-wrapv -g" \
	    LDFLAGS="-fsanitize=address,undefined" $(PY) setup.py -q build_ext \
	    --build-lib build/fuzz --build-temp build/fuzz/tmp 2>&1 | grep -v _BetaConfiguration || true
	cd build/fuzz && env LD_PRELOAD=$$($(CURDIR)/$(PY) -c 'import atheris; print(atheris.path())')/asan_with_fuzzer.so \
	    ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	    OVERLAY_NATIVE_LIB=$$(ls $(CURDIR)/build/fuzz/encap/_native*.so) PYTHONPATH=$(CURDIR) \
	    $(CURDIR)/$(PY) $(CURDIR)/tests/encap/fuzz_native.py -max_total_time=$(FUZZ_SECONDS) \
	    -rss_limit_mb=4096 -print_final_stats=1 corpus

# The benchmark matrix (several minutes); results in bench/results/<date-time>.{md,json,png}.
bench: setup
	$(PY) -m overlay bench

clean:
	rm -rf .venv *.egg-info .pytest_cache .mypy_cache .hypothesis
