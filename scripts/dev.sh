#!/usr/bin/env bash
# Everything a fresh machine needs, behind the README's two commands:
#
#   bash scripts/dev.sh demo    set up, start Kafka + Redis, load features, run the worker and a demo producer
#   bash scripts/dev.sh test    set up, run ruff + mypy, start Kafka + Redis, run the test suite, stop what it started
#   bash scripts/dev.sh check   set up, run ruff + mypy only
#
# Set-up is idempotent: Debian packages only when missing, the venv only when pyproject.toml changed.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$ROOT/.venv
PY=$VENV/bin/python
cd "$ROOT"

log() { echo "[dev] $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pick_python() {
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null &&
       "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  log "no Python >= 3.11 with venv found; installing Debian's python3-venv"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3 python3-venv >/dev/null
  echo python3
}

setup_venv() {
  local stamp=$VENV/.installed hash
  hash=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ]; then return; fi
  if [ ! -x "$PY" ]; then
    log "creating $VENV"
    "$(pick_python)" -m venv "$VENV"
  fi
  log "installing the project and its dev dependencies (first time: a few minutes)"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -e ".[dev]"
  echo "$hash" > "$stamp"
}

stack() { PYTHON=$PY bash "$ROOT/scripts/stack.sh" "$@"; }

# Static checks first: a finding fails the run before any server starts.
run_checks() {
  log "ruff check, ruff format --check, mypy"
  "$VENV/bin/ruff" check workers tests bench
  "$VENV/bin/ruff" format --check workers tests bench
  "$VENV/bin/mypy"
}

run_tests() {
  setup_venv
  run_checks
  # Stop only what this run starts: services that were already up (a demo's stack, a
  # developer's) are reused and left running, as the README promises.
  local started
  started=$(stack down-services)
  if [ -n "$started" ]; then
    # Set before `up`, so a start that fails half-way still stops what it started.
    # shellcheck disable=SC2064  # the list is fixed now, on purpose
    trap "PYTHON='$PY' bash '$ROOT/scripts/stack.sh' down $started || true" EXIT
  fi
  stack up
  # Go tools the tests run (built once into .tools/; minutes on a fresh machine, so not
  # inside a test's time limit).
  PYTHON=$PY bash "$ROOT/scripts/tools.sh" all
  "$PY" -m pytest "$@"
}

run_demo() {
  setup_venv
  stack up
  exec "$VENV/bin/fraudscore" demo "$@"
}

case "${1:-}" in
  setup) setup_venv ;;
  check) setup_venv; run_checks ;;
  test) shift; run_tests "$@" ;;
  demo) shift; run_demo "$@" ;;
  *) echo "usage: $0 setup|check|test|demo [args]" >&2; exit 2 ;;
esac
