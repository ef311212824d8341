"""Online read benchmark (not a test): what one ``LeanRedisReader.read`` costs per batch.

    .venv/bin/python bench/read_bench.py                       # ~1 minute
    .venv/bin/python bench/read_bench.py --baseline bench/results/read-<stamp>.json

Needs the local Redis (``bash scripts/stack.sh up``). The same script measures two layouts:

- *fixed-width* (the code before issue 11): the store holds 6 precomputed Float32 aggregates
  per entity, loaded by Feast materialization, and a read is one script round trip;
- *raw state* (issue 11): the store holds each customer's recent events and each
  terminal's day tiles (one Feast ``Bytes`` feature each, written by the backfill), and a
  read fetches them in one round trip and evaluates every window at each row's event time.

Which one runs follows the code it is run from (the reader's ``read`` signature), so the
"before" numbers come from running this file from a checkout of the older commit.

Population: the Handbook simulator (a typical customer has ~60 events in 30 days), plus one
hot terminal with 10,000 transactions a day (paid by customers that are never read, so the
read customers keep their ~60 events); half the rows of every batch are at the hot terminal.
Per batch size: p50/p99/mean of the whole ``read`` (round trip + decode + evaluation), and for
the raw-state reader the round trip alone (``_fetch``) beside it.
Results: printed, and written to ``bench/results/read-<time>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.offline.simulator import SimulatorConfig, simulate_transactions
from workers.records import US_PER_DAY, US_PER_SECOND
from workers.settings import Settings, load_settings

RESULTS = ROOT / "bench" / "results"
BENCH_PROJECT = "read_bench"
BENCH_REDIS_DB = 6
SIM = SimulatorConfig(n_customers=3_000, n_terminals=3_000, n_days=40, seed=13)
HOT_TERMINAL = 10**6
HOT_TX_PER_DAY = 10_000
HOT_DAYS = 38
HOT_CUSTOMERS = 20_000  # ids from 10**7: never read
BATCH_SIZES = (1, 16, 256, 1024)
REPEATS = {1: 400, 16: 300, 256: 80, 1024: 30}
DISTINCT_BATCHES = 16


def bench_settings(repo: Path) -> Settings:
    base = load_settings()
    return load_settings(
        feast={"repo_path": repo, "project": BENCH_PROJECT, "reader": "lean"},
        redis={"url": base.redis.url.rsplit("/", 1)[0] + f"/{BENCH_REDIS_DB}", "timeout_ms": 2000},
    )


def population() -> pd.DataFrame:
    """The simulated history plus the hot terminal's traffic over its last ``HOT_DAYS`` days."""
    history = simulate_transactions(SIM)
    end_day = int(history["event_time_us"].max()) // US_PER_DAY
    rng = np.random.default_rng(1)
    n = HOT_TX_PER_DAY * HOT_DAYS
    days = np.repeat(np.arange(end_day - HOT_DAYS + 1, end_day + 1), HOT_TX_PER_DAY)
    times = days * US_PER_DAY + rng.integers(0, US_PER_DAY // US_PER_SECOND, n) * US_PER_SECOND
    hot = pd.DataFrame(
        {
            "transaction_id": np.arange(n, dtype=np.int64) + len(history),
            "customer_id": 10**7 + rng.integers(0, HOT_CUSTOMERS, n),
            "terminal_id": np.full(n, HOT_TERMINAL, dtype=np.int64),
            "amount": np.round(rng.uniform(1, 100, n), 2),
            "event_time_us": times.astype(np.int64),
            "is_fraud": (rng.random(n) < 0.01).astype(np.int64),
        }
    )
    for column in history.columns.difference(hot.columns):
        hot[column] = history[column].iloc[0] if len(history) else 0
    frame = pd.concat([history, hot[history.columns]], ignore_index=True)
    return frame.sort_values("event_time_us", kind="stable").reset_index(drop=True)


def raw_state_layout() -> bool:
    from workers.features.online import LeanRedisReader

    return "event_time_us" in inspect.signature(LeanRedisReader.read).parameters


def load_store(settings: Settings, frame: pd.DataFrame, raw_state: bool) -> None:
    import redis

    redis.Redis.from_url(settings.redis.url).flushdb()
    from workers.features.store import load_online

    if raw_state:
        load_online(settings, frame)  # the backfill: every entity's end-of-history state
    else:
        load_online(settings, frame, last_days=1)  # type: ignore[call-arg,unused-ignore]  # the older signature


def batches(frame: pd.DataFrame, size: int, rng: np.random.Generator) -> list[tuple[np.ndarray, ...]]:
    """Rows scored just after the history's end: read customers have events in the last 30 days."""
    end = int(frame["event_time_us"].max())
    recent = frame[(frame["event_time_us"] >= end - 30 * US_PER_DAY) & (frame["customer_id"] < 10**7)]
    customers = recent["customer_id"].unique()
    terminals = frame.loc[frame["terminal_id"] != HOT_TERMINAL, "terminal_id"].unique()
    out = []
    for _ in range(DISTINCT_BATCHES):
        c = rng.choice(customers, size)
        t = np.where(rng.random(size) < 0.5, HOT_TERMINAL, rng.choice(terminals, size)).astype(np.int64)
        at = end + 1 + rng.integers(0, 60 * US_PER_SECOND, size)
        out.append((c.astype(np.int64), t, at.astype(np.int64)))
    return out


def timed(fn, calls: list, repeats: int) -> np.ndarray:
    for call in calls[:3]:
        fn(*call)
    samples = np.empty(repeats)
    for i in range(repeats):
        call = calls[i % len(calls)]
        started = time.perf_counter()
        fn(*call)
        samples[i] = time.perf_counter() - started
    return samples * 1e3


def summary(samples_ms: np.ndarray, rows: int) -> dict:
    return {
        "p50_ms": float(np.percentile(samples_ms, 50)),
        "p99_ms": float(np.percentile(samples_ms, 99)),
        "mean_ms": float(samples_ms.mean()),
        "us_per_row_p50": float(np.percentile(samples_ms, 50) * 1e3 / rows),
        "calls": len(samples_ms),
    }


def measure(settings: Settings, frame: pd.DataFrame, raw_state: bool) -> dict:
    from workers.features.online import LeanRedisReader

    reader = LeanRedisReader(settings)
    reader.warm_up()
    rng = np.random.default_rng(5)
    out: dict = {}
    for size in BATCH_SIZES:
        calls = batches(frame, size, rng)
        if raw_state:
            read = timed(reader.read, calls, REPEATS[size])
            keyed = [(fetch_keys(reader, c, t), len(set(c.tolist()))) for c, t, _ in calls]  # the round trip alone
            fetch = timed(reader._fetch, keyed, REPEATS[size])
            out[size] = {"read": summary(read, size), "fetch": summary(fetch, size)}
        else:
            read = timed(reader.read, [(c, t) for c, t, _ in calls], REPEATS[size])
            out[size] = {"read": summary(read, size)}
        row = out[size]
        line = f"batch {size:5d}: read p50 {row['read']['p50_ms']:.3f} ms p99 {row['read']['p99_ms']:.3f} ms"
        if "fetch" in row:
            line += f" (round trip alone p50 {row['fetch']['p50_ms']:.3f} ms)"
        print(line, flush=True)
    return out


def fetch_keys(reader, customers: np.ndarray, terminals: np.ndarray) -> list[bytes]:
    """The keys one ``read`` fetches: distinct customers first, then distinct terminals."""
    from workers.features import definitions as d

    return [reader._key(d.CUSTOMER_JOIN_KEY, c) for c in dict.fromkeys(customers.tolist())] + [
        reader._key(d.TERMINAL_JOIN_KEY, t) for t in dict.fromkeys(terminals.tolist())
    ]


def state_sizes(settings: Settings) -> dict:
    """Bytes Redis holds for a typical customer and for the hot terminal (``MEMORY USAGE``)."""
    import redis

    from workers.features.online import LeanRedisReader

    reader = LeanRedisReader(settings)
    client = redis.Redis.from_url(settings.redis.url)
    from workers.features import definitions as d

    customers = [client.memory_usage(reader._key(d.CUSTOMER_JOIN_KEY, c)) or 0 for c in range(200)]
    return {
        "customer_hash_bytes_median": float(np.median([c for c in customers if c])),
        "hot_terminal_hash_bytes": client.memory_usage(reader._key(d.TERMINAL_JOIN_KEY, HOT_TERMINAL)),
    }


def code_version() -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "workers"], cwd=ROOT, capture_output=True, text=True)
    return rev.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def write_report(report: dict, stamp: str, baseline: dict | None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"read-{stamp}.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# Online read benchmark {stamp}",
        "",
        f"code {report['code']} ({report['layout']}); machine {report['machine']}",
        f"load average before/after: {report['load_before']} / {report['load_after']}",
        f"state sizes: {report.get('state_sizes')}",
        "",
        "| batch | read p50 ms | read p99 ms | us/row (p50) | round trip alone p50 ms |",
        "|---|---|---|---|---|",
    ]
    for size, row in report["batches"].items():
        fetch = f"{row['fetch']['p50_ms']:.3f}" if "fetch" in row else "-"
        read = row["read"]
        lines.append(
            f"| {size} | {read['p50_ms']:.3f} | {read['p99_ms']:.3f} | {read['us_per_row_p50']:.1f} | {fetch} |"
        )
    if baseline is not None:
        lines += [
            "",
            (
                f"## Against {baseline['code']} ({baseline['layout']}, run {baseline['stamp']}, "
                f"load {baseline['load_before']} / {baseline['load_after']})"
            ),
            "",
            "| batch | before p50 ms | after p50 ms | before p99 ms | after p99 ms | p50 ratio |",
            "|---|---|---|---|---|---|",
        ]
        for size, row in report["batches"].items():
            before = baseline["batches"].get(str(size)) or baseline["batches"].get(size)
            if before is None:
                continue
            b, a = before["read"], row["read"]
            lines.append(
                f"| {size} | {b['p50_ms']:.3f} | {a['p50_ms']:.3f} | {b['p99_ms']:.3f} | {a['p99_ms']:.3f} "
                f"| {a['p50_ms'] / b['p50_ms']:.2f} |"
            )
    path = RESULTS / f"read-{stamp}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="an earlier read-<stamp>.json to compare with")
    args = parser.parse_args()
    repo = ROOT / ".stack" / "read-bench-feature-repo"
    repo.mkdir(parents=True, exist_ok=True)
    settings = bench_settings(repo)
    raw_state = raw_state_layout()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict = {
        "stamp": stamp,
        "code": code_version(),
        "layout": "raw state, windows at T" if raw_state else "fixed-width aggregates",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"{report['layout']} at {report['code']}: loading the store ...", flush=True)
    frame = population()
    load_store(settings, frame, raw_state)
    report["state_sizes"] = state_sizes(settings)
    report["batches"] = measure(settings, frame, raw_state)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    path = write_report(report, stamp, baseline)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
