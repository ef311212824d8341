"""``fraudscore features stream``: the stream feature job (``workers.stream``).

Registered as an action of ``features`` (``workers.cli.data``), next to ``apply`` and
``materialize``, since it keeps the same online store up to date. faust is imported here,
inside the handler, like every heavy library of the CLI.
"""

from __future__ import annotations

from workers.settings import load_settings


def run_stream_job() -> int:
    from workers.stream.app import run

    return run(load_settings())
