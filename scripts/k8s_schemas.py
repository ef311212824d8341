"""JSON schemas for kubeconform, generated from specs shipped in Go modules.

kubeconform's usual schemas are downloaded from GitHub, which is out of reach here; the Go
module proxy is not. So: ``go mod download`` the Kubernetes module (its source zip carries
``api/openapi-spec/swagger.json``) and KEDA's (``config/crd/bases``: the ScaledObject CRD),
and turn each kind into a standalone, strict JSON schema, as openapi2jsonschema --strict
does: every ``$ref`` inlined, ``additionalProperties: false`` on every object that lists
its properties (so a misspelt field fails), int-or-string as either.

    python scripts/k8s_schemas.py OUT_DIR     # writes OUT_DIR/<kind>-<group>-<version>.json

File names follow kubeconform's ``{{ .ResourceKind }}{{ .KindSuffix }}``: ``deployment-apps-v1``,
``service-v1``, ``scaledobject-keda-v1alpha1``. Re-running with the same versions is a no-op.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

KUBERNETES = "k8s.io/kubernetes@v1.31.4"
KEDA = "github.com/kedacore/keda/v2@v2.16.1"


def module_dir(module: str) -> Path:
    """Downloads ``module`` through the Go module proxy (cached) and returns its directory."""
    out = subprocess.run(["go", "mod", "download", "-json", module], capture_output=True, text=True, check=False)
    info = json.loads(out.stdout or "{}")
    if out.returncode != 0 or "Dir" not in info:
        raise SystemExit(f"go mod download {module} failed: {info.get('Error') or out.stderr}")
    return Path(info["Dir"])


def kind_suffix(group: str, version: str) -> str:
    """kubeconform's KindSuffix: ``-<first label of the group>-<version>``, or ``-<version>`` for core."""
    return f"-{group.split('.')[0]}-{version}".lower() if group else f"-{version}".lower()


def strict(schema: Any) -> Any:
    """Closes every object that lists its properties; int-or-string becomes either."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if schema.get("format") == "int-or-string" or schema.get("x-kubernetes-int-or-string"):
        schema.pop("type", None)
        schema.pop("format", None)
        schema["oneOf"] = [{"type": "string"}, {"type": "integer"}]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    return schema


def inline(schema: Any, definitions: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """``schema`` with each ``#/definitions/X`` reference replaced by X (a cycle stays open)."""
    if isinstance(schema, list):
        return [inline(item, definitions, seen) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str):  # (JSONSchemaProps also has a *property* named "$ref")
        name = ref.rsplit("/", 1)[1]
        if name in seen:  # JSONSchemaProps refers to itself: accept anything below
            return {}
        return inline(copy.deepcopy(definitions[name]), definitions, (*seen, name))
    return {key: inline(value, definitions, seen) for key, value in schema.items()}


def kubernetes_schemas(spec_path: Path) -> dict[str, dict]:
    definitions = json.loads(spec_path.read_text())["definitions"]
    schemas = {}
    for name, definition in definitions.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            if "apiVersion" not in definition.get("properties", {}):
                continue  # not a top-level object (e.g. DeleteOptions under every group)
            file = f"{gvk['kind'].lower()}{kind_suffix(gvk['group'], gvk['version'])}.json"
            schemas[file] = strict(inline(definition, definitions, (name,)))
    return schemas


def crd_schemas(crd_path: Path) -> dict[str, dict]:
    crd = yaml.safe_load(crd_path.read_text())
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    return {
        f"{kind.lower()}{kind_suffix(group, version['name'])}.json": strict(version["schema"]["openAPIV3Schema"])
        for version in crd["spec"]["versions"]
    }


def main(out_dir: Path) -> int:
    stamp = out_dir / ".generated-from"
    sources = f"{KUBERNETES} {KEDA}\n"
    if stamp.exists() and stamp.read_text() == sources:
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    schemas = kubernetes_schemas(module_dir(KUBERNETES) / "api" / "openapi-spec" / "swagger.json")
    schemas |= crd_schemas(module_dir(KEDA) / "config" / "crd" / "bases" / "keda.sh_scaledobjects.yaml")
    for file, schema in schemas.items():
        (out_dir / file).write_text(json.dumps(schema))
    stamp.write_text(sources)
    print(f"{len(schemas)} schemas in {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python scripts/k8s_schemas.py OUT_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1])))
