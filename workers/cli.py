"""``fraudscore``: one console script, one subcommand per job.

Each subcommand imports its module lazily: ``import feast`` alone costs seconds, and
commands that do not need it should not pay for it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from workers.settings import load_settings

# Modules that add subcommands with @command; a module not written yet is skipped.
PLUGIN_MODULES = ("workers.data_cli", "workers.serve_cli", "workers.grpc_cli", "workers.bench_cli")

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Registers a subcommand; ``arguments`` adds its options to its parser."""

    def register(handler: Handler) -> Handler:
        _COMMANDS[name] = (help, arguments, handler)
        return handler

    return register


@command("schemas", "regenerate protobuf code and the JSON Schema from schemas/")
def _schemas(args: argparse.Namespace) -> int:
    from workers.schemas import generate

    for path in generate():
        print(path)
    return 0


@command("config", "print the effective configuration as JSON")
def _config(args: argparse.Namespace) -> int:
    print(load_settings().model_dump_json(indent=2))
    return 0


@command("topics", "create the transactions, decisions and dead-letter topics if missing")
def _topics(args: argparse.Namespace) -> int:
    from workers.kafka.admin import default_topics, ensure_topics

    kafka = load_settings().kafka
    created = ensure_topics(kafka, default_topics(kafka))
    print(f"topics created: {created or 'none (all present)'}")
    return 0


def _smoke_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", type=int, default=10)


@command("smoke", "produce and consume a few events through the local broker and Redis", _smoke_args)
def _smoke(args: argparse.Namespace) -> int:
    from workers.smoke import run_smoke

    return run_smoke(load_settings(), args.count)


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(prog="fraudscore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, arguments, handler) in sorted(_COMMANDS.items()):
        p = sub.add_parser(name, help=help_text)
        arguments(p)
        p.set_defaults(handler=handler)
    return parser


def _load_plugins() -> None:
    """Modules that register their own subcommands (kept light: no heavy imports at top level)."""
    import importlib

    for module in PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=load_settings().log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
