# clx-pool: `make run` starts the demo pool, `make test` runs every test.
CARGO ?= cargo
CONFIG ?= config/pool.toml
BIN := target/release/clx-pool

.PHONY: build run demo test lint fmt clean

build:
	$(CARGO) build --release

run: build
	$(BIN) start --config $(CONFIG)

demo: build
	CLX_POOL=$(BIN) CONFIG=$(CONFIG) sh scripts/demo.sh

# One debug build serves unit and integration tests.
test:
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --no-fail-fast; \
	else \
		$(CARGO) test --no-fail-fast; \
	fi

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

clean:
	$(CARGO) clean
	rm -rf run
