# clx-pool: `make run` starts the demo pool, `make test` runs every test.
CARGO ?= cargo
CONFIG ?= config/pool.toml
BIN := target/release/clx-pool
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
IMAGE ?= clx-pool/test:$(VERSION)
TARGET := x86_64-unknown-linux-gnu
STATIC_BIN := target/$(TARGET)/release/clx-pool

.PHONY: build run demo test lint fmt clean install deb docker-image clm-test-image bench bench-quick bench-venv clm-venv tools-venv

build:
	$(CARGO) build --release

run: build
	$(BIN) start --config $(CONFIG)

demo: build
	CLX_POOL=$(BIN) CONFIG=$(CONFIG) sh scripts/demo.sh

# One debug build serves unit and integration tests. The CLM tests use a
# venv with today's CLM workers from PyPI (made once by clm-venv), others a
# venv of tools (the reference Prometheus parser; tools-venv).
# The swarm tests run on a two-node swarm of private dockerds
# (scripts/swarm-ci.sh: up before, down after, also on failure).
# A test that cannot run here records why in target/test-skips.txt (under
# CI=true it fails instead); the list is printed after the summary.
SKIPS = $(CURDIR)/target/test-skips.txt
test: clm-venv tools-venv
	@bash scripts/swarm-ci.sh up; \
	swarm=$$(bash scripts/swarm-ci.sh env); [ -z "$$swarm" ] || export $$swarm; \
	mkdir -p target; : > $(SKIPS); export CLX_TEST_SKIPS=$(SKIPS); \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --no-fail-fast; \
	else \
		$(CARGO) test --no-fail-fast; \
	fi; rc=$$?; bash scripts/swarm-ci.sh down; \
	if [ -s $(SKIPS) ]; then \
		echo "SKIPPED: $$(wc -l < $(SKIPS)) test(s) could not run here and passed without running:"; \
		sort $(SKIPS) | sed 's/^/  /'; \
	else echo "skipped: none (every test ran)"; fi; \
	exit $$rc

# target/clm-venv: coding-academy-lecture-manager[plantuml] 1.35.0 on a
# Python >= 3.12 found on PATH or under pyenv (skipped with a note if none).
clm-venv:
	bash scripts/clm-venv.sh

tools-venv:
	bash scripts/tools-venv.sh

# A tiny image of the built-in worker (statically linked clx-pool + busybox),
# made without any registry; the docker tests and the docker demo use it.
docker-image:
	RUSTFLAGS='-C target-feature=+crt-static' $(CARGO) build --release --target $(TARGET)
	sh scripts/docker-image.sh $(STATIC_BIN) $(IMAGE)

# CLM 1.35 and the tests' small CLM worker on Debian trixie, from
# debootstrap and PyPI (no registry); built once, then reused.
CLM_IMAGE ?= clx-pool/clm-test:1.35.0
clm-test-image:
	bash scripts/clm-test-image.sh $(CLM_IMAGE)

# Benchmarks against supervisord (installed into bench/work/venv from PyPI)
# and CLM's own workers (course builds; CLM with its notebook and PlantUML
# workers in target/bench-venv); results in bench/results.json and
# bench/results.md.
bench: build bench-venv
	python3 bench/run.py

bench-quick: build bench-venv
	python3 bench/run.py --quick

bench-venv:
	CLM_TEST_VENV=target/bench-venv CLM_PACKAGE='coding-academy-lecture-manager[notebook,plantuml]==1.35.0' \
	  bash scripts/clm-venv.sh

# The binary, its man pages and shell completions under PREFIX (DESTDIR
# for packaging): make install PREFIX=$$HOME/.local
PREFIX ?= /usr/local
install: build
	install -Dm755 $(BIN) $(DESTDIR)$(PREFIX)/bin/clx-pool
	$(BIN) man --out $(DESTDIR)$(PREFIX)/share/man/man1 >/dev/null
	install -d $(DESTDIR)$(PREFIX)/share/bash-completion/completions \
		$(DESTDIR)$(PREFIX)/share/zsh/site-functions $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
	$(BIN) completions bash > $(DESTDIR)$(PREFIX)/share/bash-completion/completions/clx-pool
	$(BIN) completions zsh > $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_clx-pool
	$(BIN) completions fish > $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/clx-pool.fish
	@echo "installed clx-pool, its man pages and completions under $(DESTDIR)$(PREFIX)"

# A Debian package of the release binary, made with dpkg-deb alone
# (scripts/deb.sh): binary, man pages, completions, the systemd unit
# template clx-pool@.service and an example pool, for
# `sudo apt install ./target/deb/clx-pool_<version>_<arch>.deb`.
DEB_DIR ?= target/deb
deb: build
	bash scripts/deb.sh $(BIN) $(DEB_DIR)

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

clean:
	$(CARGO) clean
	rm -rf run
