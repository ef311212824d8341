"""Before/after: one benchmark run on two commits in turn, on the same stack, one run.

    .venv/bin/python bench/ab_bench.py grpc --before 41ba6ef --rounds 3 -- --skip-echo --rates 500,1000
    .venv/bin/python bench/ab_bench.py kafka --before 41ba6ef --rounds 2 -- --quick --rates 1000,5000

Why interleaved: on this box the same code's gRPC p99 at 1,000 req/s moved from 4.5 ms in the
morning to 8-13 ms in the afternoon, so a "before" figure from another hour says little about
a change. Each round runs the benchmark on ``--before`` and then on ``--after`` (default HEAD),
each from its own git worktree under ``.stack/ab/`` (so neither touches this checkout's
``bench/results``), with this venv's Python, against the running stack (``scripts/stack.sh up``).
The report is the median of each side's rounds per offered rate and the ratio after/before of
those medians, with every round's figures beside it.

Results: bench/results/ab-<bench>-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
WORKTREES = ROOT / ".stack" / "ab"

# Per benchmark: its script and the result file it writes (the newest match is read).
BENCHES = {
    "grpc": ("bench/grpc_bench.py", "grpc-stream.json"),
    "kafka": ("bench/kafka_bench.py", "kafka-*.json"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench", choices=sorted(BENCHES))
    p.add_argument("--before", required=True, help="commit (or ref) measured first in each round")
    p.add_argument("--after", default="HEAD", help="commit (or ref) measured second in each round")
    p.add_argument("--rounds", type=int, default=2)
    argv = sys.argv[1:] if argv is None else argv
    # Everything after "--" goes to the benchmark untouched.
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.bench_args = argv[split + 1 :]
    return args


def worktree(ref: str) -> tuple[str, Path]:
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True, text=True)
    short = sha.stdout.strip()
    path = WORKTREES / short
    if not (path / ".git").exists():
        WORKTREES.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(path), short], cwd=ROOT, check=True)
    return short, path


def newest(directory: Path, pattern: str) -> Path | None:
    found = [p for p in directory.glob(pattern) if "profile" not in p.name]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def grpc_rows(result: dict) -> dict[float, dict]:
    return {
        float(row["offered_rps"]): {
            "p50_ms": row["p50_us"] / 1000,
            "p99_ms": row["p99_us"] / 1000,
            "degraded": sum(row["degraded_by_cause"].values()),
            "answered": row["received"],
        }
        for row in result["rows"]
        if row["phase"] == "service"
    }


def kafka_rows(result: dict) -> dict[float, dict]:
    rows = {
        float(row["offered_rate"]): {
            "p50_ms": row["p50_ms"],
            "p99_ms": row["p99_ms"],
            "degraded": row["degraded"],
            "answered": row["decided"],
        }
        for row in result["latency"]
    }
    drain = result["throughput"]
    # The drain (no offered rate) as rate 0: its figure of merit is events/s.
    rows[0.0] = {"events_per_s": drain["throughput_events_per_s"], "degraded": drain["degraded"]}
    return rows


def run_once(bench: str, path: Path, bench_args: list[str]) -> dict[float, dict]:
    script, pattern = BENCHES[bench]
    results = path / "bench" / "results"
    started = time.time()
    subprocess.run([sys.executable, script, *bench_args], cwd=path, check=True)
    written = newest(results, pattern)
    if written is None or written.stat().st_mtime < started:
        raise RuntimeError(f"{script} in {path} wrote no new {pattern}")
    result = json.loads(written.read_text())
    return grpc_rows(result) if bench == "grpc" else kafka_rows(result)


def summarise(rounds: list[dict[str, dict[float, dict]]], sides: tuple[str, str]) -> list[dict]:
    """Per offered rate: each side's rounds and medians, and the ratio after/before of the medians."""
    rates = sorted({rate for r in rounds for side in sides for rate in r[side]})
    summary = []
    for rate in rates:
        entry: dict = {"offered_rate": rate}
        metrics = ("events_per_s",) if rate == 0 else ("p50_ms", "p99_ms")
        for metric in (*metrics, "degraded"):
            values = {side: [r[side][rate][metric] for r in rounds if rate in r[side]] for side in sides}
            entry[metric] = {side: values[side] for side in sides}
            medians = {side: statistics.median(v) for side, v in values.items() if v}
            entry[f"{metric}_median"] = medians
            if len(medians) == 2 and medians[sides[0]]:
                entry[f"{metric}_ratio"] = medians[sides[1]] / medians[sides[0]]
        summary.append(entry)
    return summary


def markdown(bench: str, meta: dict, summary: list[dict], sides: tuple[str, str]) -> str:
    before, after = sides
    lines = [f"# Before/after, {bench} benchmark: {before} (before) vs {after} (after), interleaved", ""]
    lines += ["```", json.dumps(meta, indent=2), "```", ""]
    lines += [
        "| offered/s | metric | before, each round | after, each round | median before | median after | after/before |"
    ]
    lines += ["|---|---|---|---|---|---|---|"]
    for entry in summary:
        rate = "drain" if entry["offered_rate"] == 0 else f"{entry['offered_rate']:g}"
        for metric in ("events_per_s", "p50_ms", "p99_ms", "degraded"):
            if metric not in entry:
                continue
            each = entry[metric]
            med = entry[f"{metric}_median"]
            ratio = entry.get(f"{metric}_ratio")
            lines.append(
                f"| {rate} | {metric} | {', '.join(f'{v:.4g}' for v in each[before])} "
                f"| {', '.join(f'{v:.4g}' for v in each[after])} | {med.get(before, float('nan')):.4g} "
                f"| {med.get(after, float('nan')):.4g} | {'' if ratio is None else f'{ratio:.2f}'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    before, before_path = worktree(args.before)
    after, after_path = worktree(args.after)
    sides = (before, after)
    rounds: list[dict[str, dict[float, dict]]] = []
    loads = []
    for n in range(args.rounds):
        measured: dict[str, dict[float, dict]] = {}
        for side, path in ((before, before_path), (after, after_path)):
            loads.append(Path("/proc/loadavg").read_text().split()[0])
            print(f"[ab] round {n + 1}/{args.rounds}: {side}", flush=True)
            measured[side] = run_once(args.bench, path, args.bench_args)
        rounds.append(measured)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    meta = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "bench": args.bench,
        "bench_args": args.bench_args,
        "before": before,
        "after": after,
        "rounds": args.rounds,
        "load_at_each_start": loads,
    }
    summary = summarise(rounds, sides)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    base = RESULTS_DIR / f"ab-{args.bench}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=2) + "\n")
    md = markdown(args.bench, meta, summary, sides)
    base.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
