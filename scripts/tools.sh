#!/usr/bin/env bash
# Builds the Go tools the tests use into .tools/ (git-ignored), once, from the Go module proxy.
#
#   scripts/tools.sh jaeger|kubeconform|kustomize   prints the binary's path
#   scripts/tools.sh k8s-schemas                    prints the schema directory
#   scripts/tools.sh all                            builds all of them (the test command does, before pytest)
#
# Exit 3 if Go is absent, 1 if it does not build (the reason on stderr).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/.tools/bin

need_go() {
  command -v go >/dev/null || { echo "[tools] Go is not installed: cannot build $1" >&2; exit 3; }
}

build() {  # name module@version
  local name=$1 module=$2
  if [ -x "$BIN/$name" ]; then echo "$BIN/$name"; return; fi
  need_go "$name"
  mkdir -p "$BIN"
  echo "[tools] building $module into $BIN" >&2
  GOBIN=$BIN go install "$module" >&2 || { echo "[tools] $module did not build" >&2; exit 1; }
  echo "$BIN/$name"
}

# A program whose module has replace directives cannot be `go install`ed by version: it is
# built as a tool of a throw-away module instead (the replaces do not apply; it builds).
build_as_tool() {  # name package module@version
  local name=$1 package=$2 module=$3 work
  if [ -x "$BIN/$name" ]; then echo "$BIN/$name"; return; fi
  need_go "$name"
  mkdir -p "$BIN"
  work=$ROOT/.tools/build-$name
  rm -rf "$work" && mkdir -p "$work"
  echo "[tools] building $package ($module) into $BIN: the first time takes minutes" >&2
  (cd "$work" && go mod init "tools/$name" >/dev/null 2>&1 && go get -tool "$module" >&2 &&
    go build -o "$BIN/$name.partial" "$package" >&2) || { echo "[tools] $package did not build" >&2; exit 1; }
  mv "$BIN/$name.partial" "$BIN/$name"
  echo "$BIN/$name"
}

# Kubernetes JSON schemas for kubeconform, from Kubernetes' and KEDA's Go modules (not GitHub).
k8s_schemas() {
  need_go "the Kubernetes schemas"
  "${PYTHON:-$ROOT/.venv/bin/python}" "$ROOT/scripts/k8s_schemas.py" "$ROOT/.tools/k8s-schemas" >&2 || exit 1
  echo "$ROOT/.tools/k8s-schemas"
}

tool() {
  case "$1" in
    # v1.76.0 of the module is Jaeger v2 (cmd/jaeger, built on the OpenTelemetry Collector).
    jaeger) build_as_tool jaeger github.com/jaegertracing/jaeger/cmd/jaeger github.com/jaegertracing/jaeger/cmd/jaeger@v1.76.0 ;;
    kubeconform) build kubeconform github.com/yannh/kubeconform/cmd/kubeconform@v0.8.0 ;;
    # v5.6.0: v5.8 needs Go >= 1.27 (this box has 1.26).
    kustomize) build kustomize sigs.k8s.io/kustomize/kustomize/v5@v5.6.0 ;;
    k8s-schemas) k8s_schemas ;;
    *) echo "usage: $0 jaeger|kubeconform|kustomize|k8s-schemas|all" >&2; exit 2 ;;
  esac
}

if [ "${1:-}" = all ]; then
  for name in jaeger kubeconform kustomize k8s-schemas; do tool "$name" >/dev/null; done
else
  tool "${1:-}"
fi
