"""Regenerates everything derived from the wire contracts: ``fraudscore schemas``.

- ``schemas/fraud/v1/*.proto`` -> ``workers/proto/fraud/v1/*_pb2*.py`` (grpcio-tools).
  The ``workers/proto=schemas`` import mapping makes the generated modules import each
  other as ``workers.proto.fraud.v1`` without any post-processing.
- ``workers.records.Transaction`` -> ``schemas/transaction.schema.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from workers.records import transaction_json_schema
from workers.settings import REPO_ROOT

SCHEMAS = REPO_ROOT / "schemas"
PROTO_FILES = sorted(p.relative_to(SCHEMAS) for p in SCHEMAS.rglob("*.proto"))
JSON_SCHEMA = SCHEMAS / "transaction.schema.json"


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
    json_out = out_root / "schemas" / JSON_SCHEMA.name
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(transaction_json_schema(), indent=2, sort_keys=True) + "\n")
    return [*sorted(proto_out.rglob("*.py*")), json_out]
