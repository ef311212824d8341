"""Stream feature job benchmark: replay events/s per process, freshness at a live rate, state size.

    python bench/stream_bench.py --replay 30000 --rates 1000,5000 --seconds 10

One job process (``fraudscore features stream``, memory store unless ``--store rocksdb``) on
isolated topics and a Feast project of its own:
1. replay: ``--replay`` events produced as one backlog; the time from the job's first applied
   event to the last (its /metrics counter), and the job's CPU seconds over that. By default
   (``--backlog running``) the backlog is produced once the job is ready, so both stages work
   on it in the measured window, as in a long catch-up. ``--backlog before-start`` puts it in
   the topic before the job starts (the figures before 2026-12-07): stage 1 then routes it
   all while faust is still starting, and the figure is stage 2's alone;
2. freshness: events stamped with the current time are produced at each rate for ``--seconds``;
   the job's ``fraudscore_feature_freshness_seconds`` histogram (event time -> written in
   Redis) over that phase gives p50/p99 (bucket upper bounds, so at most one bucket high);
3. state: the job's state bytes / entities gauges.
With ``--scorer on`` (the default) the scoring worker (``fraudscore serve``) runs beside the job
from the end of the replay on, reading the store the job writes: it scores every live event,
as in production, and each rate reports its decisions and its event -> decision p50/p99.
``--scorer off`` measures the job alone (the figures before 2026-12-07 13:00 UTC).
Prints a summary and writes bench/results/stream-<stamp>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from tests.kafka.harness import WorkerProcess, feast_env, free_port, start_worker, worker_env
from tests.stream import harness as h
from workers import codec
from workers.features import watermark
from workers.health import is_ready
from workers.kafka.admin import default_topics, delete_topics, ensure_topics, isolated
from workers.kafka.config import connection_config
from workers.records import US_PER_SECOND, Transaction
from workers.settings import REPO_ROOT, load_settings
from workers.stream.topology import job_topics

RESULTS = REPO_ROOT / "bench" / "results"


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def applied(metrics: dict) -> float:
    return metrics.get(("fraudscore_stream_events_total", (("kind", "transaction"), ("result", "applied"))), 0.0)


def start_profile(pid: int, path: Path, mode: str, rate: int = 250) -> subprocess.Popen:
    """py-spy (this venv's) on the job, its threads apart, until SIGINT: raw collapsed stacks.
    ``gil``: only samples holding the GIL (what bounds the process); ``idle``: waits too."""
    py_spy = Path(sys.executable).with_name("py-spy")
    command = [
        str(py_spy),
        "record",
        "-p",
        str(pid),
        "-r",
        str(rate),
        "-f",
        "raw",
        "--threads",
        "--nonblocking",
        "-o",
        str(path),
    ]
    command += {"cpu": [], "gil": ["--gil"], "idle": ["--idle"]}[mode]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def events(n: int, customers: int, terminals: int, rng: random.Random, now: bool, start_us: int) -> list[Transaction]:
    prefix = uuid.uuid4().hex[:6]
    out = []
    for i in range(n):
        t = int(time.time() * US_PER_SECOND) if now else start_us + i * 1_000_000
        out.append(
            Transaction(f"{prefix}-{i}", rng.randrange(customers), rng.randrange(terminals), rng.uniform(1, 300), t)
        )
    return out


def produce(producer: Producer, topic: str, txns: list[Transaction]) -> None:
    """Encoded first, then produced: the backlog then arrives in a burst, as fast as the client sends."""
    messages = [(t.transaction_id.encode(), codec.encode_transaction_json(t)) for t in txns]
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(60) == 0


def _live_producer(kafka_json: str, rate: float, n: int, customers: int, terminals: int, out) -> None:
    """Open loop in a process of its own: events stamped with their send time, on schedule
    whatever the job does (the bench's own loop in the measuring process fell behind at 5k/s)."""
    from workers.settings import KafkaSettings

    kafka = KafkaSettings.model_validate_json(kafka_json)
    producer = Producer({**connection_config(kafka, "bench"), "linger.ms": 1, "acks": "all"})
    rng = random.Random(1)
    prefix = uuid.uuid4().hex[:6]
    pool = [(rng.randrange(customers), rng.randrange(terminals), round(rng.uniform(1, 300), 2)) for _ in range(10_000)]
    encode, topic = codec.encode_transaction_json, kafka.transactions_topic
    started = time.monotonic()
    sent = 0
    while sent < n:
        due = min(n, int((time.monotonic() - started) * rate) + 1)
        while sent < due:
            customer, terminal, amount = pool[sent % len(pool)]
            now_us = time.time_ns() // 1000
            value = encode(Transaction(f"{prefix}-{sent}", customer, terminal, amount, now_us))
            try:
                producer.produce(topic, value=value)
                sent += 1
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
        time.sleep(0.0005)
    elapsed = time.monotonic() - started
    producer.flush(30)
    out.send(n / elapsed)


def produce_live(kafka, rate: float, n: int, customers: int, terminals: int) -> float:
    """Runs the open-loop producer process; returns the rate it achieved."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_live_producer, args=(kafka.model_dump_json(), rate, n, customers, terminals, send))
    process.start()
    achieved = receive.recv()
    process.join()
    return achieved


def start_scorer(job, tmp: Path) -> tuple[WorkerProcess, int]:
    """The scoring worker on the job's transactions and store, its group committed at the
    topic's end: it scores the live phases only, not the replay's backlog."""
    # The replay is this project's backfill: the store counts as loaded from here on.
    watermark.write(redis.Redis.from_url(job.redis.url), job.feast.project, "stream-bench replay")
    kafka = job.kafka
    h.commit_group_at(kafka, h.end_offsets(kafka, kafka.transactions_topic))
    port = free_port()
    env = worker_env(
        kafka,
        feast_env(job),
        FRAUDSCORE_METRICS__PORT=str(port),
        FRAUDSCORE_KAFKA__DECISION_FORMAT=job.kafka.decision_format,  # as configured, not the tests' protobuf
    )
    return start_worker(env, tmp / "scorer.log"), port


def scorer_phase(before: dict, after: dict, cpu_s: float, n: int) -> dict:
    """What the scorer did over one live phase: decisions, event -> decision, CPU per event."""

    def delta(name: str) -> int:
        return int(sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == name))

    return {
        "decisions": delta("fraudscore_decisions_total"),
        "degraded": delta("fraudscore_degraded_decisions_total"),
        "end_to_end": histogram_quantiles(before, after, "stage", "end_to_end", "fraudscore_stage_latency_seconds"),
        "cpu_us_per_event": round(cpu_s / n * 1e6, 1),
    }


def wait_applied(port: int, target: float, timeout_s: float) -> tuple[float | None, float | None]:
    """(monotonic time of the first applied event, of the target reached)."""
    first = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = applied(scrape(port))
        except OSError:
            value = 0.0
        now = time.monotonic()
        if value > 0 and first is None:
            first = now
        if value >= target:
            return first, now
        time.sleep(0.2)  # a /metrics render costs the job ~10 ms of CPU: not too often
    return first, None


def wait_ready(port: int, timeout_s: float) -> None:
    """Until both stages hold their partitions (``/readyz``), and a little longer: faust's agent
    starts reading its partitions just after the assignment."""
    deadline = time.monotonic() + timeout_s
    while not is_ready(port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the job was not ready within {timeout_s} s")
        time.sleep(0.2)
    time.sleep(2)


def wait_scorer_ready(scorer: WorkerProcess, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not is_ready(port):
        if time.monotonic() > deadline or scorer.process.poll() is not None:
            raise RuntimeError(f"the scorer was not ready within {timeout_s} s:\n{scorer.log()[-2000:]}")
        time.sleep(0.2)


def settle(port: int, timeout_s: float = 120) -> None:
    """Until the job has nothing pending for the store and has consumed everything (its lag
    gauges, refreshed every 5 s, at 0): the next phase then measures only its own events."""
    deadline = time.monotonic() + timeout_s
    time.sleep(5.5)
    while time.monotonic() < deadline:
        metrics = scrape(port)
        lag = sum(v for (name, _), v in metrics.items() if name == "fraudscore_stream_lag_messages")
        pending = metrics.get(("fraudscore_stream_store_pending_entities", ()), 0.0)
        if lag == 0 and pending == 0:
            return
        time.sleep(1)


def histogram_quantiles(
    before: dict, after: dict, label: str, value_of_label: str, metric: str = "fraudscore_feature_freshness_seconds"
) -> dict[str, float | int]:
    """p50/p99 (bucket upper bounds) of the observations between two scrapes of ``metric``
    with ``label`` = ``value_of_label``."""
    buckets = []
    for (name, labels), value in after.items():
        if name == f"{metric}_bucket" and dict(labels).get(label) == value_of_label:
            le = float(dict(labels)["le"])
            buckets.append((le, value - before.get((name, labels), 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    result: dict[str, float | int] = {"observations": int(total)}
    for q in (0.5, 0.99):
        result[f"p{int(q * 100)}_s_at_most"] = next((le for le, c in buckets if total and c >= q * total), float("nan"))
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replay", type=int, default=30_000)
    parser.add_argument("--rates", default="1000,5000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--customers", type=int, default=5_000)
    parser.add_argument("--terminals", type=int, default=10_000)
    # Each slice sends up to 2 x partitions repartition messages, each ~1.5 ms of faust CPU:
    # at a live rate that per-message cost, not the events, is what saturates the job.
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--slice-ms", type=float, default=20.0)
    parser.add_argument("--profile", type=Path, help="py-spy the job over the replay, raw stacks to this file")
    parser.add_argument("--profile-mode", choices=("cpu", "gil", "idle"), default="cpu")
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples a second")
    parser.add_argument(
        "--profile-phase", choices=("replay", "live"), default="replay", help="live: over the last rate's phase"
    )
    parser.add_argument("--backlog", choices=("running", "before-start"), default="running")
    parser.add_argument("--store", choices=("memory", "rocksdb"), default="memory", help="the job's table store")
    parser.add_argument(
        "--scorer", choices=("on", "off"), default="on", help="the scoring worker beside the live phases"
    )
    args = parser.parse_args()

    base = load_settings()
    kafka = isolated(base.kafka, f"bench-{uuid.uuid4().hex[:6]}")
    topics = default_topics(kafka)
    ensure_topics(kafka, topics)
    tmp = Path(tempfile.mkdtemp(prefix="stream-bench-"))
    job = h.job_settings(base, kafka, tmp, partitions=args.partitions)
    job = job.model_copy(
        update={"stream": job.stream.model_copy(update={"slice_ms": args.slice_ms, "store": args.store})}
    )
    rng = random.Random(0)
    producer = Producer({**connection_config(kafka, "bench"), "linger.ms": 5, "acks": "all"})
    start_us = int(time.time() * US_PER_SECOND) - args.replay * 1_000_000
    backlog = events(args.replay, args.customers, args.terminals, rng, False, start_us)
    if args.backlog == "before-start":
        produce(producer, kafka.transactions_topic, backlog)

    env = h.job_env(job, "bench")
    port = int(env["FRAUDSCORE_METRICS__STREAM_PORT"])
    worker = h.start_job(env, tmp / "job.log")
    if args.backlog == "running":
        wait_ready(port, 120)
        produce(producer, kafka.transactions_topic, backlog)
    result: dict = {
        "backlog": args.backlog,
        "store": args.store,
        "replay_events": args.replay,
        "customers": args.customers,
        "terminals": args.terminals,
        "partitions": args.partitions,
        "slice_ms": args.slice_ms,
        "scorer": args.scorer,
    }
    scorer, scorer_port = None, 0
    try:
        cpu_before = None
        first, done = None, None
        spy = None
        # CPU is read from the first applied event on, so start-up and recovery are not in it.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and cpu_before is None:
            try:
                if applied(scrape(port)) > 0:
                    cpu_before = cpu_seconds(worker.process.pid)
                    first = time.monotonic()
                    if args.profile and args.profile_phase == "replay":
                        spy = start_profile(worker.process.pid, args.profile, args.profile_mode, args.profile_rate)
            except OSError:
                pass
            time.sleep(0.05)
        _, done = wait_applied(port, args.replay, 600)
        if args.profile and spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        if first and done:
            cpu = cpu_seconds(worker.process.pid) - (cpu_before or 0.0)
            result["replay_seconds"] = round(done - first, 2)
            result["replay_events_per_s"] = round(args.replay / (done - first))
            result["replay_cpu_us_per_event"] = round(cpu / args.replay * 1e6, 1)
        settle(port)
        metrics = scrape(port)
        for kind in ("customer", "terminal"):
            size = metrics.get(("fraudscore_stream_state_bytes", (("entity", kind),)), 0.0)
            count = metrics.get(("fraudscore_stream_state_entities", (("entity", kind),)), 0.0)
            result[f"state_bytes_per_{kind}"] = round(size / count) if count else None
        total = args.replay
        if args.scorer == "on":
            scorer, scorer_port = start_scorer(job, tmp)
            wait_scorer_ready(scorer, scorer_port, 120)
        rates = [int(r) for r in args.rates.split(",")]
        for rate in rates:
            before = scrape(port)
            scorer_before = scrape(scorer_port) if scorer else {}
            n = int(rate * args.seconds)
            cpu_at_start = cpu_seconds(worker.process.pid)
            scorer_cpu_at_start = cpu_seconds(scorer.process.pid) if scorer else 0.0
            if args.profile and args.profile_phase == "live" and rate == rates[-1]:
                spy = start_profile(worker.process.pid, args.profile, args.profile_mode, args.profile_rate)
            achieved = produce_live(kafka, rate, n, args.customers, args.terminals)
            if args.profile and args.profile_phase == "live" and spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            total += n
            wait_applied(port, total, 120)
            # Before settle(): its wait is idle, but the job's timers still run.
            cpu_per_event = (cpu_seconds(worker.process.pid) - cpu_at_start) / n
            scorer_cpu = cpu_seconds(scorer.process.pid) - scorer_cpu_at_start if scorer else 0.0
            settle(port)
            after = scrape(port)
            phase = result[f"freshness_at_{rate}_per_s"] = {
                "achieved_rate": round(achieved),
                "cpu_us_per_event": round(cpu_per_event * 1e6, 1),
                "customer": histogram_quantiles(before, after, "entity", "customer"),
                "terminal": histogram_quantiles(before, after, "entity", "terminal"),
                # Where the freshness goes: per repartition message, per store write.
                "stages": {
                    stage: histogram_quantiles(before, after, "stage", stage, "fraudscore_stream_stage_seconds")
                    for stage in ("source", "repartition", "apply", "store_write")
                },
            }
            if scorer:
                phase["scorer"] = scorer_phase(scorer_before, scrape(scorer_port), scorer_cpu, n)
    finally:
        worker.stop()
        if scorer:
            scorer.stop()
            watermark.clear(redis.Redis.from_url(job.redis.url), job.feast.project)
        # The job's own topics too: a broker that keeps every run's changelogs starts slower
        # and compacts them in the background, disturbing the next run.
        delete_topics(kafka, [*topics, *job_topics(job), f"{job.stream.app_id}-__assignor-__leader"])
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    RESULTS.mkdir(parents=True, exist_ok=True)
    result["load_average"] = os.getloadavg()
    (RESULTS / f"stream-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# stream feature job bench {stamp} UTC", "", "```", json.dumps(result, indent=2), "```", ""]
    (RESULTS / f"stream-{stamp}.md").write_text("\n".join(lines))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
