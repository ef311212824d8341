"""A gRPC server (real engine, in-memory features) in a process of its own, for tests that
measure the server's memory: ``python tests/rpc/server_process.py MODEL_DIR`` prints
``PORT <n>`` once serving and runs until its stdin closes."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.* imports

from tests.rpc.harness import SlowReader, service_settings, serving


async def main(model_dir: Path) -> None:
    async with serving(service_settings(model_dir), SlowReader()) as service:
        print(f"PORT {service.port}", flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the test closes our stdin


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
