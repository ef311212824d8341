"""Soak benchmark (not a test): the Kafka worker at a fixed rate for minutes, its memory over time.

    .venv/bin/python bench/soak_bench.py                      # 2,000 events/s for 10 minutes
    .venv/bin/python bench/soak_bench.py --minutes 30 --rate 5000
    .venv/bin/python bench/soak_bench.py --quick              # 2 minutes, to try it out

Needs the local stack (``bash scripts/stack.sh up``). One worker process (``fraudscore serve``)
drains fresh topics fed by an open-loop producer process (the one ``kafka_bench.py`` uses);
every ``--interval`` seconds the worker's resident memory is read from ``/proc/<pid>/status``
(VmRSS, and RssAnon: the heap and arenas, without mapped files such as the model and shared
libraries). tracemalloc would say *what* grows, but tracing every allocation slows the worker
several times over, so it belongs in a separate, short diagnostic run, not in the soak.

Verdict: a least-squares slope (MB/min) of RSS over the first and the last half of the run
(and per quarter). The memory "levels off" when the last half grows by less than
``LEVEL_MB_PER_MIN``: ~12 MB an hour, which a long-running worker can carry for days.
Results: printed, and written to ``bench/results/soak-<time>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

# The worker set-up and the open-loop producer are kafka_bench's.
import kafka_bench as kb

from workers.kafka.admin import default_topics, delete_topics
from workers.kafka.config import connection_config
from workers.settings import KafkaSettings, Settings

LEVEL_MB_PER_MIN = 0.2


# --- sampling -------------------------------------------------------------------------------


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS / RssAnon / RssFile of a live process, in kB (Linux)."""
    wanted = {"VmRSS", "RssAnon", "RssFile", "VmHWM"}
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in wanted:
                values[name] = int(rest.split()[0])
    return values


def decisions_so_far(kafka: KafkaSettings) -> int:
    """Decisions the broker holds for this run: the decisions topic's high watermarks, summed."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**connection_config(kafka, "bench"), "group.id": "soak-watermarks"})
    try:
        return sum(
            consumer.get_watermark_offsets(TopicPartition(kafka.decisions_topic, p), timeout=5, cached=False)[1]
            for p in range(kafka.transactions_partitions)
        )
    finally:
        consumer.close()


def sample_until(pid: int, kafka: KafkaSettings, seconds: float, interval_s: float) -> list[dict]:
    samples = []
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        row = {"t_s": round(elapsed, 1), **memory_kb(pid), "decisions": decisions_so_far(kafka)}
        samples.append(row)
        if len(samples) % max(1, int(60 / interval_s)) == 1:
            print(
                f"  t={elapsed:5.0f}s  RSS {row['VmRSS'] / 1024:7.1f} MB  anon {row['RssAnon'] / 1024:7.1f} MB  "
                f"decisions {row['decisions']}",
                flush=True,
            )
        if elapsed >= seconds:
            return samples
        time.sleep(max(0.0, started + len(samples) * interval_s - time.monotonic()))


# --- analysis -------------------------------------------------------------------------------


def slope_mb_per_min(samples: list[dict], key: str = "VmRSS") -> float:
    if len(samples) < 2:
        return float("nan")
    t_min = np.array([s["t_s"] for s in samples]) / 60.0
    mb = np.array([s[key] for s in samples]) / 1024.0
    return float(np.polyfit(t_min, mb, 1)[0])


def pieces(samples: list[dict], n: int) -> list[list[dict]]:
    size = len(samples) // n
    return [samples[i * size : (i + 1) * size] for i in range(n)]


def analyse(samples: list[dict]) -> dict:
    first, last = pieces(samples, 2)
    result = {
        "rss_start_mb": samples[0]["VmRSS"] / 1024,
        "rss_end_mb": samples[-1]["VmRSS"] / 1024,
        "rss_peak_mb": max(s["VmRSS"] for s in samples) / 1024,
        "anon_start_mb": samples[0]["RssAnon"] / 1024,
        "anon_end_mb": samples[-1]["RssAnon"] / 1024,
    }
    for key, name in (("VmRSS", "rss"), ("RssAnon", "anon")):
        result[f"{name}_slope_first_half_mb_per_min"] = slope_mb_per_min(first, key)
        result[f"{name}_slope_last_half_mb_per_min"] = slope_mb_per_min(last, key)
        result[f"{name}_slope_quarters_mb_per_min"] = [slope_mb_per_min(q, key) for q in pieces(samples, 4)]
    result["levels_off"] = bool(result["rss_slope_last_half_mb_per_min"] < LEVEL_MB_PER_MIN)
    return result


# --- the run --------------------------------------------------------------------------------


def run_soak(settings: Settings, rate: float, seconds: float, interval_s: float) -> dict:
    kafka = kb.fresh_topics(settings)
    total = int(rate * seconds)
    ctx = mp.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    producer = ctx.Process(target=kb._produce_process, args=(kafka.model_dump_json(), rate, seconds, total, ready, go))
    producer.start()
    ready.wait(120)
    # Our own metrics port (kafka_bench's fixed one may be in use by another run on the host).
    env = {**kb.worker_env(settings, kafka), "FRAUDSCORE_METRICS__PORT": str(settings.metrics.port)}
    worker = kb.start_worker(env, kafka)
    try:
        go.set()
        samples = sample_until(worker.pid, kafka, seconds, interval_s)
        producer.join(120)
        decided = _wait_for_decisions(kafka, total, timeout_s=60)
        degraded = degraded_by_cause(settings.metrics.port)
    finally:
        kb.stop_worker(worker)
        delete_topics(kafka, list(default_topics(kafka)))
    return {
        "rate": rate,
        "seconds": seconds,
        "events": total,
        "decided": decided,
        "degraded_by_cause": degraded,
        "interval_s": interval_s,
        "samples": samples,
        "analysis": analyse(samples),
    }


def degraded_by_cause(metrics_port: int) -> dict[str, float]:
    """The worker's own degraded-decision counter, by cause (a busy box shows up here first)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return {
        sample.labels["cause"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "fraudscore_degraded_decisions"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.value > 0
    }


def _wait_for_decisions(kafka: KafkaSettings, total: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    decided = decisions_so_far(kafka)
    while decided < total and time.monotonic() < deadline:
        time.sleep(1)
        decided = decisions_so_far(kafka)
    return decided


# --- reporting ------------------------------------------------------------------------------


def write_report(report: dict, stamp: str) -> None:
    kb.RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = kb.RESULTS / f"soak-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2))
    run, a = report["run"], report["run"]["analysis"]
    verdict = "levels off" if a["levels_off"] else "does NOT level off"
    quarters = ", ".join(f"{q:+.2f}" for q in a["rss_slope_quarters_mb_per_min"])
    lines = [
        f"# Kafka worker soak {stamp}", "",
        (f"machine: {report['machine']}; load average before {report['loadavg_before']}, "
        f"after {report['loadavg_after']} (other engineers share this 2-core box)"), "",
        (f"{run['rate']:.0f} events/s for {run['seconds'] / 60:.1f} min: {run['decided']} of {run['events']} decided "
        f"(degraded by cause: {run['degraded_by_cause'] or 'none'}); "
        f"worker RSS sampled every {run['interval_s']:.0f} s from /proc/<pid>/status."), "",
        (f"**RSS {a['rss_start_mb']:.1f} -> {a['rss_end_mb']:.1f} MB (peak {a['rss_peak_mb']:.1f}); "
        f"slope first half {a['rss_slope_first_half_mb_per_min']:+.2f} MB/min, last half "
        f"{a['rss_slope_last_half_mb_per_min']:+.2f} MB/min: {verdict}** "
        f"(criterion: last half < {LEVEL_MB_PER_MIN} MB/min)."), "",
        f"- per quarter (MB/min): {quarters}",
        (f"- RssAnon (heap and arenas) {a['anon_start_mb']:.1f} -> {a['anon_end_mb']:.1f} MB; slope first half "
        f"{a['anon_slope_first_half_mb_per_min']:+.2f}, last half {a['anon_slope_last_half_mb_per_min']:+.2f} MB/min"),
        "", "| t s | VmRSS MB | RssAnon MB | RssFile MB | decisions |", "|---|---|---|---|---|",
    ]  # fmt: skip
    step = max(1, len(run["samples"]) // 20)
    for s in run["samples"][::step]:
        lines.append(
            f"| {s['t_s']:.0f} | {s['VmRSS'] / 1024:.1f} | {s['RssAnon'] / 1024:.1f} | "
            f"{s['RssFile'] / 1024:.1f} | {s['decisions']} |"
        )
    if report.get("notes"):
        lines += ["", "## What this shows", "", report["notes"]]
    md = "\n".join(lines) + "\n"
    (kb.RESULTS / f"soak-{stamp}.md").write_text(md)
    print("\n" + md)
    print(f"written: {json_path.relative_to(kb.ROOT)} and .md")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2_000.0, help="events per second (open loop)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--quick", action="store_true", help="2 minutes")
    args = parser.parse_args()
    minutes = 2.0 if args.quick else args.minutes
    repo = kb.ROOT / ".stack" / "bench-feature-repo"
    repo.mkdir(parents=True, exist_ok=True)
    settings = kb.bench_settings(repo)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print("materializing benchmark features ...", flush=True)
    kb.materialize(settings)
    report: dict = {"machine": kb._machine(), "loadavg_before": _loadavg()}
    print(f"soak: {args.rate:.0f} events/s for {minutes:.1f} min ...", flush=True)
    report["run"] = run_soak(settings, args.rate, minutes * 60, args.interval)
    report["loadavg_after"] = _loadavg()
    write_report(report, stamp)
    return 0


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


if __name__ == "__main__":
    sys.exit(main())
