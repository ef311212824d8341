"""Set-up and inspection commands: ``config``, ``topics``, ``schemas``, ``smoke``."""

from __future__ import annotations

import argparse
import json

from workers.cli import command
from workers.settings import load_settings, redacted


@command("schemas", "regenerate protobuf code and the JSON Schema from schemas/")
def _schemas(_args: argparse.Namespace) -> int:
    from workers.cli.schemas import generate

    for path in generate():
        print(path)
    return 0


@command("config", "print the effective configuration as JSON (secrets masked)")
def _config(_args: argparse.Namespace) -> int:
    print(json.dumps(redacted(load_settings()), indent=2))
    return 0


@command("topics", "create the transactions, decisions, fraud-labels and dead-letter topics if missing")
def _topics(_args: argparse.Namespace) -> int:
    from workers.kafka.admin import default_topics, ensure_topics

    kafka = load_settings().kafka
    created = ensure_topics(kafka, default_topics(kafka))
    print(f"topics created: {created or 'none (all present)'}")
    return 0


def _smoke_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", type=int, default=10)


@command("smoke", "produce and consume a few events through the local broker and Redis", _smoke_args)
def _smoke(args: argparse.Namespace) -> int:
    from workers.cli.smoke import run_smoke

    return run_smoke(load_settings(), args.count)
