"""Importing Feast must not switch this process's metrics to prometheus multiprocess mode."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import os
from workers.engine import engine  # the worker's import order: metrics first
from workers.features import online, store  # imports feast, which sets PROMETHEUS_MULTIPROC_DIR
import prometheus_client.values as values
print(values.ValueClass.__name__, os.environ.get("PROMETHEUS_MULTIPROC_DIR"), os.environ.get("PROMETHEUS_MULTIPROCESS_DIR"))
"""


def test_feast_import_leaves_metrics_in_process_and_env_clean() -> None:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PROMETHEUS_MULTIPROC")}
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["MutexValue", "None", "None"], out.stdout + out.stderr
