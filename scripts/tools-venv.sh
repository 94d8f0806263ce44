#!/usr/bin/env bash
# Creates the Python venv of tools the tests use (the reference Prometheus
# text parser, prometheus_client) in target/tools-venv, once. Without pip
# access it says so and exits 0 (those tests then skip with a message),
# except under CI=true, where it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TOOLS_TEST_VENV:-target/tools-venv}
PACKAGES='prometheus_client==0.26.0'
STAMP="$VENV/.clx-pool-installed"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PACKAGES" ]; then
  exit 0
fi
echo "creating $VENV with $PACKAGES"
rm -rf "$VENV"
if ! python3 -m venv "$VENV" || ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $PACKAGES; then
  msg="cannot create $VENV; the tests that parse /metrics with prometheus_client will be skipped"
  if [ "${CI:-}" = "true" ]; then echo "error: $msg" >&2; exit 1; fi
  echo "note: $msg" >&2
  exit 0
fi
echo "$PACKAGES" > "$STAMP"
