#!/usr/bin/env bash
# Builds the Go tools the tests use into .tools/ (git-ignored), once, from the Go module proxy.
#
#   scripts/tools.sh jaeger     prints the binary's path (Jaeger v2: the collector of the tracing tests)
#
# Exit 3 if Go is absent, 1 if it does not build (the reason on stderr).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/.tools/bin

# A program whose module has replace directives cannot be `go install`ed by version: it is
# built as a tool of a throw-away module instead (the replaces do not apply; it builds).
build_as_tool() {  # name package module@version
  local name=$1 package=$2 module=$3 work
  if [ -x "$BIN/$name" ]; then echo "$BIN/$name"; return; fi
  command -v go >/dev/null || { echo "[tools] Go is not installed: cannot build $name" >&2; exit 3; }
  mkdir -p "$BIN"
  work=$ROOT/.tools/build-$name
  rm -rf "$work" && mkdir -p "$work"
  echo "[tools] building $package ($module) into $BIN: the first time takes minutes" >&2
  (cd "$work" && go mod init "tools/$name" >/dev/null 2>&1 && go get -tool "$module" >&2 &&
    go build -o "$BIN/$name.partial" "$package" >&2) || { echo "[tools] $package did not build" >&2; exit 1; }
  mv "$BIN/$name.partial" "$BIN/$name"
  echo "$BIN/$name"
}

case "${1:-}" in
  # v1.76.0 of the module is Jaeger v2 (cmd/jaeger, built on the OpenTelemetry Collector).
  jaeger) build_as_tool jaeger github.com/jaegertracing/jaeger/cmd/jaeger github.com/jaegertracing/jaeger/cmd/jaeger@v1.76.0 ;;
  *) echo "usage: $0 jaeger" >&2; exit 2 ;;
esac
