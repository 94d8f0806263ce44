#!/usr/bin/env bash
# Creates the Python venv the CLM tests use: today's CLM workers from PyPI
# (coding-academy-lecture-manager, which needs Python >= 3.12) in
# target/clm-venv, once. Without such an interpreter it says so and exits 0
# (the CLM tests then skip with a message), except under CI=true, where it
# fails.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CLM_TEST_VENV:-target/clm-venv}
PACKAGE=${CLM_PACKAGE:-'coding-academy-lecture-manager[plantuml,docker]==1.35.0'}
STAMP="$VENV/.clx-pool-installed"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PACKAGE" ]; then
  exit 0
fi

find_python() {
  local candidates=(python3.13 python3.12)
  for c in "${candidates[@]}"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  for d in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*; do
    if [ -x "$d/bin/python3" ] && "$d/bin/python3" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$d/bin/python3"; return 0
    fi
  done
  return 1
}

if ! PY=$(find_python); then
  msg="no Python >= 3.12 found (python3.13/python3.12 on PATH or under pyenv); the CLM tests will be skipped"
  if [ "${CI:-}" = "true" ]; then echo "error: $msg" >&2; exit 1; fi
  echo "note: $msg" >&2
  exit 0
fi

echo "creating $VENV with $PY ($("$PY" --version)) and $PACKAGE"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$PACKAGE"
echo "$PACKAGE" > "$STAMP"
