#!/usr/bin/env bash
# Builds the Go tools the tests use into .tools/bin (git-ignored), once, from the Go module proxy.
#
#   scripts/tools.sh dashboard-linter    prints the binary's path; exit 3 if Go is absent,
#                                        1 if it does not build (the reason on stderr)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/.tools/bin

build() {  # name module@version
  local name=$1 module=$2
  if [ -x "$BIN/$name" ]; then echo "$BIN/$name"; return; fi
  command -v go >/dev/null || { echo "[tools] Go is not installed: cannot build $name" >&2; exit 3; }
  mkdir -p "$BIN"
  echo "[tools] building $module into $BIN" >&2
  GOBIN=$BIN go install "$module" >&2 || { echo "[tools] $module did not build" >&2; exit 1; }
  echo "$BIN/$name"
}

case "${1:-}" in
  dashboard-linter) build dashboard-linter github.com/grafana/dashboard-linter@latest ;;
  *) echo "usage: $0 dashboard-linter" >&2; exit 2 ;;
esac
