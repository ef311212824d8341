"""Regenerates everything derived from the wire contracts: ``fraudscore schemas``.

- ``schemas/fraud/v1/*.proto`` -> ``workers/proto/fraud/v1/*_pb2*.py`` (grpcio-tools).
  The ``workers/proto=schemas`` import mapping makes the generated modules import each
  other as ``workers.proto.fraud.v1`` without any post-processing.
- ``workers.records.Transaction`` -> ``schemas/transaction.schema.json``.
- ``workers.records.FraudLabel`` -> ``schemas/fraud-label.schema.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from workers.records import fraud_label_json_schema, transaction_json_schema
from workers.settings import REPO_ROOT

SCHEMAS = REPO_ROOT / "schemas"
PROTO_FILES = sorted(p.relative_to(SCHEMAS) for p in SCHEMAS.rglob("*.proto"))
JSON_SCHEMA = SCHEMAS / "transaction.schema.json"
LABEL_JSON_SCHEMA = SCHEMAS / "fraud-label.schema.json"


def generate(out_root: Path = REPO_ROOT) -> list[Path]:
    """Writes the generated files under ``out_root`` and returns their paths."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    proto_out = out_root / "workers" / "proto"
    args = [
        "protoc",
        f"-Iworkers/proto={SCHEMAS}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(f"{SCHEMAS / p}" for p in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    for leaf in {(proto_out / p).parent for p in PROTO_FILES}:
        for package_dir in (leaf, *leaf.relative_to(proto_out).parents):
            (proto_out / package_dir / "__init__.py").touch()
    json_outs = []
    for schema_file, schema in (
        (JSON_SCHEMA, transaction_json_schema()),
        (LABEL_JSON_SCHEMA, fraud_label_json_schema()),
    ):
        json_out = out_root / "schemas" / schema_file.name
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        json_outs.append(json_out)
    return [*sorted(proto_out.rglob("*.py*")), *json_outs]
