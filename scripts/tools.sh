#!/usr/bin/env bash
# Builds the Go tools the tests use into .tools/ (git-ignored), once, from the Go module proxy.
#
#   scripts/tools.sh dashboard-linter|kubeconform|kustomize   prints the binary's path
#   scripts/tools.sh k8s-schemas                              prints the schema directory
#
# Exit 3 if Go is absent, 1 if it does not build (the reason on stderr).
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

# Kubernetes JSON schemas for kubeconform, from Kubernetes' and KEDA's Go modules (not GitHub).
k8s_schemas() {
  command -v go >/dev/null || { echo "[tools] Go is not installed: cannot fetch the Kubernetes spec" >&2; exit 3; }
  "${PYTHON:-$ROOT/.venv/bin/python}" "$ROOT/scripts/k8s_schemas.py" "$ROOT/.tools/k8s-schemas" >&2 || exit 1
  echo "$ROOT/.tools/k8s-schemas"
}

case "${1:-}" in
  dashboard-linter) build dashboard-linter github.com/grafana/dashboard-linter@latest ;;
  kubeconform) build kubeconform github.com/yannh/kubeconform/cmd/kubeconform@v0.8.0 ;;
  # v5.6.0: v5.8 needs Go >= 1.27 (this box has 1.26).
  kustomize) build kustomize sigs.k8s.io/kustomize/kustomize/v5@v5.6.0 ;;
  k8s-schemas) k8s_schemas ;;
  *) echo "usage: $0 dashboard-linter|kubeconform|kustomize|k8s-schemas" >&2; exit 2 ;;
esac
