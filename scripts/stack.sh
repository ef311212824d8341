#!/usr/bin/env bash
# The local stack without Docker: a single-node Apache Kafka broker (KRaft), a redis-server and
# a Prometheus, all on 127.0.0.1, at the addresses the worker's settings name
# (python -m workers.cli.stack_env). Prometheus scrapes every fraudscore process the settings
# describe (the worker, each gRPC process) from target files generated from the same settings,
# and loads the alert rules in deploy/prometheus/rules.yml.
#
#   scripts/stack.sh up       install what is missing, start (or reuse) Kafka + Redis + Prometheus, create topics
#   scripts/stack.sh down     stop what this script started (down kafka / redis / prometheus: only those named)
#   scripts/stack.sh down-services   name the services not answering now (those `up` would start)
#   scripts/stack.sh status   say what is running
#   scripts/stack.sh reset    stop what this script started and delete the broker's data and the
#                             benchmarks' Feast repos, so the next `up` starts empty (a broker that
#                             kept every test's and benchmark's topics spends minutes loading them)
#
# Kafka's jars come from Maven Central (scripts/kafka/pom.xml) into $FRAUDSCORE_CACHE
# (default ~/.cache/fraudscore); state and logs go to .stack/ in the repo (git-ignored).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
CACHE=${FRAUDSCORE_CACHE:-$HOME/.cache/fraudscore}
STATE=$ROOT/.stack
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$ROOT/scripts/kafka/pom.xml")
KAFKA_LIBS=$CACHE/kafka-$KAFKA_VERSION/libs

eval "$("$PY" -m workers.cli.stack_env)"

log() { echo "[stack] $*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

apt_install() {
  log "installing Debian packages: $*"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_system_packages() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || missing+=(maven)
  # Debian's package brings promtool too (the alert-rule tests run it).
  command -v prometheus >/dev/null || missing+=(prometheus)
  if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

ensure_kafka_jars() {
  if [ -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" ]; then return; fi
  log "downloading Apache Kafka $KAFKA_VERSION through Maven into $KAFKA_LIBS"
  mvn -q -B -Dstyle.color=never -f "$ROOT/scripts/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS.partial"
  rm -rf "$KAFKA_LIBS" && mv "$KAFKA_LIBS.partial" "$KAFKA_LIBS"
}

start_redis() {
  if port_open "$REDIS_HOST" "$REDIS_PORT"; then
    log "redis already answering on $REDIS_HOST:$REDIS_PORT (reused)"
    return
  fi
  mkdir -p "$STATE"
  # No persistence: this Redis holds the online store for local runs and tests only.
  redis-server --bind "$REDIS_HOST" --port "$REDIS_PORT" --save '' --appendonly no \
    --daemonize yes --pidfile "$STATE/redis.pid" --logfile "$STATE/redis.log" --dir "$STATE"
  for _ in $(seq 50); do port_open "$REDIS_HOST" "$REDIS_PORT" && break; sleep 0.1; done
  port_open "$REDIS_HOST" "$REDIS_PORT" || { log "redis did not start:"; tail -20 "$STATE/redis.log" >&2; exit 1; }
  log "redis up on $REDIS_HOST:$REDIS_PORT"
}

# A small heap and few GC threads: the broker shares two cores with Redis and the worker.
KAFKA_JAVA=(java -Xms256m -Xmx768m -XX:+UseG1GC -XX:ParallelGCThreads=2 -XX:ConcGCThreads=1
  "-Dlog4j.configuration=file:$ROOT/scripts/kafka/log4j.properties" -cp "$KAFKA_LIBS/*")

start_kafka() {
  if port_open "$KAFKA_HOST" "$KAFKA_PORT"; then
    log "kafka already answering on $KAFKA_HOST:$KAFKA_PORT (reused)"
    return
  fi
  ensure_kafka_jars
  local data=$STATE/kafka-data config=$STATE/server.properties
  mkdir -p "$STATE"
  sed -e "s|@HOST@|$KAFKA_HOST|g" -e "s|@PORT@|$KAFKA_PORT|g" \
      -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" -e "s|@DATA_DIR@|$data|g" \
      "$ROOT/scripts/kafka/server.properties.in" > "$config"
  if [ ! -f "$data/meta.properties" ]; then
    "${KAFKA_JAVA[@]}" kafka.tools.StorageTool format -c "$config" \
      -t "$("${KAFKA_JAVA[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null)" >/dev/null 2>&1
  fi
  # setsid: the broker outlives this script and is not killed with the caller's process group.
  setsid "${KAFKA_JAVA[@]}" kafka.Kafka "$config" >"$STATE/kafka.log" 2>&1 < /dev/null &
  echo $! > "$STATE/kafka.pid"
  # Wait for the listener before asking for metadata: librdkafka logs every refused connect.
  for _ in $(seq 180); do port_open "$KAFKA_HOST" "$KAFKA_PORT" && break; sleep 0.5; done
  if ! "$PY" -c "
from workers.settings import load_settings
from workers.kafka.admin import wait_until_ready
wait_until_ready(load_settings().kafka, timeout_s=90)"; then
    log "kafka did not become ready; last log lines:"; tail -30 "$STATE/kafka.log" >&2; exit 1
  fi
  log "kafka $KAFKA_VERSION up on $KAFKA_HOST:$KAFKA_PORT (KRaft, log: $STATE/kafka.log)"
}

prometheus_ready() {
  "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
    "http://$PROMETHEUS_HOST:$PROMETHEUS_PORT/-/ready" 2>/dev/null
}

start_prometheus() {
  local dir=$STATE/prometheus
  mkdir -p "$dir"
  # Targets are (re)written even when a Prometheus is reused: it re-reads them on change.
  "$PY" -m workers.cli.stack_env prometheus "$dir" >/dev/null
  if port_open "$PROMETHEUS_HOST" "$PROMETHEUS_PORT"; then
    # Target files are re-read on change, but a new job (a new process kind) is in the config
    # itself, which Prometheus re-reads only when told (--web.enable-lifecycle).
    "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(urllib.request.Request(sys.argv[1], method="POST"), timeout=5)' \
      "http://$PROMETHEUS_HOST:$PROMETHEUS_PORT/-/reload" 2>/dev/null \
      || log "prometheus on $PROMETHEUS_HOST:$PROMETHEUS_PORT did not reload its config (restart it for new jobs)"
    log "prometheus already answering on $PROMETHEUS_HOST:$PROMETHEUS_PORT (reused, config reloaded)"
    return
  fi
  setsid prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
    --storage.tsdb.retention.time=2d --web.listen-address="$PROMETHEUS_HOST:$PROMETHEUS_PORT" \
    --web.enable-lifecycle >"$STATE/prometheus.log" 2>&1 < /dev/null &
  echo $! > "$STATE/prometheus.pid"
  for _ in $(seq 100); do prometheus_ready && break; sleep 0.2; done
  prometheus_ready || { log "prometheus did not start:"; tail -20 "$STATE/prometheus.log" >&2; exit 1; }
  log "prometheus up on http://$PROMETHEUS_HOST:$PROMETHEUS_PORT (targets: $dir/targets, log: $STATE/prometheus.log)"
}

create_topics() {
  "$PY" -m workers topics >&2
}

stop_pidfile() {
  local name=$1 pidfile=$2
  [ -f "$pidfile" ] || return 0
  local pid; pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    # A clean broker shutdown flushes logs; give it time before forcing.
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { log "$name did not stop in 30 s, killing"; kill -KILL "$pid"; }
    log "$name stopped"
  fi
  rm -f "$pidfile"
}

status() {
  port_open "$KAFKA_HOST" "$KAFKA_PORT" && echo "kafka: up on $KAFKA_HOST:$KAFKA_PORT" || echo "kafka: down"
  port_open "$REDIS_HOST" "$REDIS_PORT" && echo "redis: up on $REDIS_HOST:$REDIS_PORT" || echo "redis: down"
  port_open "$PROMETHEUS_HOST" "$PROMETHEUS_PORT" && echo "prometheus: up on http://$PROMETHEUS_HOST:$PROMETHEUS_PORT" \
    || echo "prometheus: down"
}

case "${1:-}" in
  up)
    ensure_system_packages
    start_redis
    start_kafka
    start_prometheus
    create_topics
    status
    ;;
  down)
    # `down` stops all three; `down kafka redis` only those named.
    shift
    for service in "${@:-prometheus kafka redis}"; do
      for name in $service; do stop_pidfile "$name" "$STATE/$name.pid"; done
    done
    ;;
  down-services)
    # The services not answering now, i.e. those a following `up` will start (dev.sh test
    # stops only those at its end).
    port_open "$KAFKA_HOST" "$KAFKA_PORT" || printf 'kafka '
    port_open "$REDIS_HOST" "$REDIS_PORT" || printf 'redis '
    port_open "$PROMETHEUS_HOST" "$PROMETHEUS_PORT" || printf 'prometheus '
    ;;
  reset)
    for name in prometheus kafka redis; do stop_pidfile "$name" "$STATE/$name.pid"; done
    if port_open "$KAFKA_HOST" "$KAFKA_PORT"; then
      log "a broker this script did not start answers on $KAFKA_HOST:$KAFKA_PORT; its data is not ours to delete"
      exit 1
    fi
    rm -rf "$STATE/kafka-data" "$STATE/bench-feature-repo" "$STATE/read-bench-feature-repo"
    log "broker data and benchmark Feast repos deleted; the next up starts empty"
    ;;
  status) status ;;
  *) echo "usage: $0 up|down [kafka|redis|prometheus]|down-services|status|reset" >&2; exit 2 ;;
esac
