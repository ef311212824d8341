"""``fraudscore``: one console script, one subcommand per job, one module per command group.

| module | commands |
|---|---|
| ``admin`` | ``config``, ``topics``, ``schemas``, ``smoke``: set-up and inspection |
| ``data`` | ``simulate``, ``train``, ``features``: the offline side |
| ``serve`` | ``serve`` (Kafka worker), ``produce``, ``demo`` |
| ``rpc`` | ``grpc`` (gRPC + REST server), ``grpc-bench`` |

Command modules import their heavy libraries inside the handlers: ``import feast`` alone
costs seconds, and commands that do not need it should not pay for it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from workers.settings import load_settings

COMMAND_MODULES = ("workers.cli.admin", "workers.cli.data", "workers.cli.serve", "workers.cli.rpc")

Handler = Callable[[argparse.Namespace], int]
Arguments = Callable[[argparse.ArgumentParser], None]
_COMMANDS: dict[str, tuple[str, Arguments, Handler]] = {}


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def command(name: str, help_text: str, arguments: Arguments = _no_arguments) -> Callable[[Handler], Handler]:
    """Registers a subcommand; ``arguments`` adds its options to its parser."""

    def register(handler: Handler) -> Handler:
        _COMMANDS[name] = (help_text, arguments, handler)
        return handler

    return register


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(prog="fraudscore", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, arguments, handler) in sorted(_COMMANDS.items()):
        p = sub.add_parser(name, help=help_text)
        arguments(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=load_settings().log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
