"""Feast object definitions for the ``feast`` CLI (``feast apply`` imports every .py here).

The objects are built by ``workers.features.store.repo_objects`` so that the CLI and the
in-code store register exactly the same entities, push sources and feature views. Keep data
generators out of this folder: ``fraudscore simulate`` writes ``data/`` (git-ignored).
"""

from pathlib import Path

from workers.features.store import repo_objects

_objects = repo_objects(Path(__file__).resolve().parent / "data")

customer = _objects.customer
terminal = _objects.terminal
customer_spending_push = _objects.customer_push
terminal_risk_push = _objects.terminal_push
customer_spending = _objects.customer_view
terminal_risk = _objects.terminal_view
