"""Kafka worker benchmark (not a test): floors, sustained throughput, latency at several rates.

    .venv/bin/python bench/kafka_bench.py                # full run, ~4 minutes
    .venv/bin/python bench/kafka_bench.py --quick        # smaller, ~1.5 minutes

Needs the local stack (``bash scripts/stack.sh up``) and the models in ``models/``.
Everything runs on this machine: broker, Redis, worker, producer and reader share the cores,
so the numbers are for the whole box, not for the worker alone.

One run measures, in order:
1. floors: ONNX Runtime batch inference time and one online-store read (Redis pipeline)
   per batch size, medians over repeated calls;
2. sustained throughput: N events pre-loaded into the topic, then one worker process drains
   them; events/s = N / (last decision - first decision);
3. latency at offered rates: an open-loop producer process stamps each event with its send
   time; a reader process records when each decision becomes readable. p50/p99/p999 of
   (decision readable - event sent);
4. time split by stage, from the worker's own Prometheus histograms.
Results: printed, and written to ``bench/results/kafka-<time>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.features import definitions as d
from workers.kafka.admin import wait_for_group_assignment
from workers.kafka.config import connection_config
from workers.offline.simulator import LiveStream, SimulatorConfig
from workers.settings import Settings, load_settings

RESULTS = ROOT / "bench" / "results"
METRICS_PORT = 9199
BENCH_PROJECT = "bench"
BENCH_REDIS_DB = 5
SIM = SimulatorConfig(n_customers=5_000, n_terminals=10_000, n_days=40, seed=11)


# --- set-up -------------------------------------------------------------------------------


def bench_settings(repo: Path) -> Settings:
    base = load_settings()
    return load_settings(
        feast={"repo_path": repo, "project": BENCH_PROJECT, "reader": "lean"},
        redis={"url": base.redis.url.rsplit("/", 1)[0] + f"/{BENCH_REDIS_DB}"},
    )


def materialize(settings: Settings) -> None:
    import redis

    from workers.features.store import load_online
    from workers.offline.simulator import simulate_transactions

    redis.Redis.from_url(settings.redis.url).flushdb()
    load_online(settings, simulate_transactions(SIM))


def fresh_topics(settings: Settings):
    from workers.kafka.admin import default_topics, ensure_topics, isolated

    kafka = isolated(settings.kafka, f"bench-{uuid.uuid4().hex[:8]}")
    ensure_topics(kafka, default_topics(kafka))
    return kafka


def worker_env(settings: Settings, kafka) -> dict[str, str]:
    return {
        **os.environ,
        "FRAUDSCORE_KAFKA__TRANSACTIONS_TOPIC": kafka.transactions_topic,
        "FRAUDSCORE_KAFKA__DECISIONS_TOPIC": kafka.decisions_topic,
        "FRAUDSCORE_KAFKA__DLQ_TOPIC": kafka.dlq_topic,
        "FRAUDSCORE_KAFKA__GROUP_ID": kafka.group_id,
        "FRAUDSCORE_FEAST__REPO_PATH": str(settings.feast.repo_path),
        "FRAUDSCORE_FEAST__PROJECT": settings.feast.project,
        "FRAUDSCORE_REDIS__URL": settings.redis.url,
        "FRAUDSCORE_METRICS__PORT": str(METRICS_PORT),
        "FRAUDSCORE_LOG_LEVEL": "WARNING",
    }


def start_worker(env: dict[str, str], kafka, profile_to: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "workers", "serve"]
    if profile_to is not None:
        # py-spy samples the real worker at 100 Hz; --nonblocking keeps its overhead small.
        command = [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--nonblocking",
            "-r",
            "100",
            "-f",
            "speedscope",
            "-o",
            str(profile_to),
            "--",
            *command,
        ]
    # Own process group: stopping it must reach the worker too when py-spy is its parent.
    process = subprocess.Popen(command, env=env, cwd=ROOT, start_new_session=True)
    # Ready means owning partitions, not merely running: model load and group join take a moment.
    try:
        wait_for_group_assignment(kafka, timeout_s=90)
    except TimeoutError:
        process.kill()
        raise
    return process


def stop_worker(process: subprocess.Popen) -> None:
    # SIGINT: the worker drains as on SIGTERM, and py-spy (when profiling) writes its profile.
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    # py-spy exits when its child does; wait for the group to be gone so the metrics port is free.
    for _ in range(100):
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


# --- floors ---------------------------------------------------------------------------------


def floors(settings: Settings, batch_sizes: list[int], repeats: int) -> dict:
    import onnxruntime as ort

    from workers.engine.models import ModelRegistry
    from workers.features.online import LeanRedisReader

    artifact = ModelRegistry(settings.model.directory).load(settings.model.name, settings.model.version)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(artifact.path), options, providers=["CPUExecutionProvider"])
    reader = LeanRedisReader(settings)
    stream = LiveStream.create(config=SIM)
    result = {"model": artifact.label, "batches": {}}
    for size in batch_sizes:
        cols = stream.batch_arrays(size)
        features = np.random.default_rng(0).random((size, d.N_FEATURES), dtype=np.float32)
        onnx_s = _median_time(lambda features=features: session.run(None, {"features": features}), repeats)
        redis_s = _median_time(
            lambda cols=cols: reader.read(cols["customer_id"], cols["terminal_id"], cols["event_time_us"]), repeats
        )
        result["batches"][size] = {
            "onnx_ms": onnx_s * 1e3,
            "redis_read_ms": redis_s * 1e3,
            "floor_events_per_s": size / (onnx_s + redis_s),
        }
    return result


def _median_time(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return float(np.median(samples))


# --- producer and reader processes ------------------------------------------------------------


def _produce_process(kafka_json: str, rate: float, seconds: float, total: int, ready, go) -> None:
    """Open loop: events are sent on a fixed schedule whatever the worker does."""
    from confluent_kafka import Producer

    from workers import codec
    from workers.records import Transaction
    from workers.settings import KafkaSettings

    kafka = KafkaSettings.model_validate_json(kafka_json)
    stream = LiveStream.create(config=SIM)
    producer = Producer(
        {
            **connection_config(kafka, "bench"),
            "linger.ms": 1,
            "acks": 1,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    pool = stream.batch(min(total, 200_000))
    ready.set()
    go.wait()
    started = time.monotonic()
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic() - started) * rate) + 1) if rate else total
        while sent < due:
            template = pool[sent % len(pool)]
            txn = Transaction(
                f"b-{sent}", template.customer_id, template.terminal_id, template.amount, time.time_ns() // 1000
            )
            try:
                producer.produce(
                    kafka.transactions_topic, key=txn.transaction_id, value=codec.encode_transaction_json(txn)
                )
                sent += 1
            except BufferError:
                producer.poll(0.001)
        producer.poll(0)
        if rate:
            time.sleep(0.0005)
    producer.flush(60)


def _read_process(kafka_json: str, expected: int, timeout_s: float, out, ready=None) -> None:
    """Records (event sent, decision readable) for every decision; sends arrays back."""
    from confluent_kafka import Consumer

    from workers import codec
    from workers.settings import KafkaSettings

    kafka = KafkaSettings.model_validate_json(kafka_json)
    consumer = Consumer(
        {
            **connection_config(kafka, "bench"),
            "group.id": f"reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 5,
        }
    )
    # Signal only once partitions are ours: a reader still joining its group would add its
    # start-up to the first decisions' latency.
    consumer.subscribe([kafka.decisions_topic], on_assign=lambda c, parts: ready and ready.set())
    sent_us, seen_us, produced_ms, degraded = [], [], [], 0
    deadline = time.monotonic() + timeout_s
    while len(seen_us) < expected and time.monotonic() < deadline:
        # consume() waits for num_messages *or* the timeout: keep the timeout short so the
        # measuring reader adds at most ~2 ms to what it measures.
        for message in consumer.consume(num_messages=5000, timeout=0.002):
            if message.error() is not None:
                continue
            now_us = time.time_ns() // 1000
            decision = codec.decode_decision_json(message.value())
            sent_us.append(decision.event_time_us)
            seen_us.append(now_us)
            produced_ms.append(message.timestamp()[1])  # CreateTime: when the worker produced it
            degraded += decision.degraded
    consumer.close()
    out.send(
        (
            np.array(sent_us, dtype=np.int64),
            np.array(seen_us, dtype=np.int64),
            np.array(produced_ms, dtype=np.int64),
            degraded,
        )
    )


def run_load(
    settings: Settings,
    rate: float,
    seconds: float,
    total: int | None = None,
    profile_to: Path | None = None,
    preload: bool = False,
) -> dict:
    """Starts a worker, offers load, returns latency and throughput figures."""
    kafka = fresh_topics(settings)
    total = total or int(rate * seconds)
    ctx = mp.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    producer = ctx.Process(
        target=_produce_process, args=(kafka.model_dump_json(), 0 if preload else rate, seconds, total, ready, go)
    )
    receive, send = ctx.Pipe(duplex=False)
    reader_ready = ctx.Event()
    reader = ctx.Process(
        target=_read_process, args=(kafka.model_dump_json(), total, seconds * 4 + 120, send, reader_ready)
    )
    producer.start()
    ready.wait(120)
    if preload:
        go.set()
        producer.join()
    worker = start_worker(worker_env(settings, kafka), kafka, profile_to)
    reader.start()
    if not reader_ready.wait(60):
        stop_worker(worker)
        raise RuntimeError("decision reader never got its partitions")
    _reset_stage_metrics = scrape_stages()
    go.set()
    if not receive.poll(seconds * 4 + 180):  # the reader died or hung: fail, do not wait forever
        stop_worker(worker)
        raise RuntimeError("decision reader sent no results")
    sent_us, seen_us, produced_ms, degraded = receive.recv()
    reader.join()
    producer.join()
    stages = stage_split(_reset_stage_metrics, scrape_stages())
    stop_worker(worker)
    latency_ms = (seen_us - sent_us) / 1000.0
    result = {
        "offered_rate": None if preload else rate,
        "events": total,
        "decided": len(seen_us),
        "degraded": int(degraded),
        "stages_ms_mean": stages,
    }
    if len(seen_us) > 1:
        # The worker's own pace: first to last decision by the decisions' produce timestamps.
        span_s = (produced_ms.max() - produced_ms.min()) / 1e3
        result["throughput_events_per_s"] = len(seen_us) / span_s if span_s > 0 else None
        result.update({f"p{q}_ms": float(np.percentile(latency_ms, q)) for q in (50, 99, 99.9)})
    return result


def scrape_stages(port: int = METRICS_PORT) -> dict[str, tuple[float, float]]:
    """stage -> (sum seconds, count) from the worker's histograms."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in ("fraudscore_stage_latency_seconds", "fraudscore_inference_latency_seconds"):
            continue
        for sample in family.samples:
            key = sample.labels.get("stage") or f"inference[{sample.labels.get('device')}]"
            if sample.name.endswith("_sum"):
                totals.setdefault(key, [0.0, 0.0])[0] = sample.value
            elif sample.name.endswith("_count"):
                totals.setdefault(key, [0.0, 0.0])[1] = sample.value
    return {k: (v[0], v[1]) for k, v in totals.items()}


def stage_split(before: dict, after: dict) -> dict[str, float]:
    split = {}
    for stage, (total_s, count) in after.items():
        prev_s, prev_n = before.get(stage, (0.0, 0.0))
        if count - prev_n > 0:
            split[stage] = round((total_s - prev_s) / (count - prev_n) * 1e3, 4)
    return split


# --- main ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rates", default="", help="comma-separated offered rates (events/s)")
    parser.add_argument("--profile", action="store_true", help="py-spy profile of the throughput run")
    args = parser.parse_args()
    quick = args.quick
    repo = ROOT / ".stack" / "bench-feature-repo"
    repo.mkdir(parents=True, exist_ok=True)
    settings = bench_settings(repo)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    print("materializing benchmark features ...", flush=True)
    materialize(settings)
    report: dict = {"machine": _machine(), "model": f"{settings.model.name}-{settings.model.version}"}

    print("floors ...", flush=True)
    report["floors"] = floors(settings, [1, 64, 256, 1024], repeats=50 if quick else 200)

    drain_events = 60_000 if quick else 200_000
    print(f"throughput: draining {drain_events} pre-loaded events ...", flush=True)
    profile = RESULTS / f"kafka-{stamp}-profile.speedscope.json" if args.profile else None
    report["throughput"] = run_load(settings, rate=0, seconds=30, total=drain_events, preload=True, profile_to=profile)
    if profile:
        report["profile"] = str(profile.relative_to(ROOT))

    sustained = report["throughput"].get("throughput_events_per_s") or 10_000
    rates = [float(r) for r in args.rates.split(",") if r] or [1_000, 5_000, round(sustained / 2), 15_000]
    report["latency"] = []
    for rate in rates:
        print(f"latency at {rate:.0f} events/s ...", flush=True)
        report["latency"].append(run_load(settings, rate=rate, seconds=10 if quick else 20))

    write_report(report, stamp)
    return 0


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def write_report(report: dict, stamp: str) -> None:
    json_path = RESULTS / f"kafka-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    lines = [
        f"# Kafka worker benchmark {stamp}",
        "",
        f"machine: {report['machine']}",
        "",
        "## Floors (median per call, 1 ONNX thread)",
        "",
        "| batch | ONNX ms | Redis read ms | floor events/s |",
        "|---|---|---|---|",
    ]
    for size, row in report["floors"]["batches"].items():
        lines.append(
            f"| {size} | {row['onnx_ms']:.3f} | {row['redis_read_ms']:.3f} | {row['floor_events_per_s']:.0f} |"
        )
    t = report["throughput"]
    lines += [
        "",
        "## Sustained throughput (drain of pre-loaded topic, one worker process)",
        "",
        (
            f"{t['decided']} of {t['events']} decided, **{t.get('throughput_events_per_s', 0):.0f} events/s**, "
            f"degraded {t['degraded']}"
        ),
        "",
        f"stage means (ms): {t['stages_ms_mean']}",
        "",
        "## Latency, event sent -> decision readable (open-loop producer)",
        "",
        "| offered/s | decided | achieved/s | p50 ms | p99 ms | p99.9 ms | degraded |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["latency"]:
        lines.append(
            f"| {row['offered_rate']:.0f} | {row['decided']} | {row.get('throughput_events_per_s', 0):.0f} | "
            f"{row.get('p50_ms', float('nan')):.1f} | {row.get('p99_ms', float('nan')):.1f} | "
            f"{row.get('p99.9_ms', float('nan')):.1f} | {row['degraded']} |"
        )
    lines += ["", "stage means (ms) per rate:", ""]
    lines += [f"- {row['offered_rate']:.0f}/s: {row['stages_ms_mean']}" for row in report["latency"]]
    md = "\n".join(lines) + "\n"
    (RESULTS / f"kafka-{stamp}.md").write_text(md)
    print("\n" + md)
    print(f"written: {json_path.relative_to(ROOT)} and .md")


if __name__ == "__main__":
    sys.exit(main())
