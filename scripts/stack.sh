#!/usr/bin/env bash
# The local stack without Docker: a single-node Apache Kafka broker (KRaft) and a redis-server,
# both on 127.0.0.1, at the addresses the worker's settings name (python -m workers.cli.stack_env).
#
#   scripts/stack.sh up       install what is missing, start (or reuse) Kafka + Redis, create topics
#   scripts/stack.sh down     stop what this script started (down kafka / down redis: one of them)
#   scripts/stack.sh status   say what is running
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
}

case "${1:-}" in
  up)
    ensure_system_packages
    start_redis
    start_kafka
    create_topics
    status
    ;;
  down)
    # `down` stops both; `down kafka` or `down redis` only the one named.
    shift
    for service in "${@:-kafka redis}"; do
      for name in $service; do stop_pidfile "$name" "$STATE/$name.pid"; done
    done
    ;;
  down-services)
    # The services not answering now, i.e. those a following `up` will start (dev.sh test
    # stops only those at its end).
    port_open "$KAFKA_HOST" "$KAFKA_PORT" || printf 'kafka '
    port_open "$REDIS_HOST" "$REDIS_PORT" || printf 'redis '
    ;;
  status) status ;;
  *) echo "usage: $0 up|down [kafka|redis]|down-services|status" >&2; exit 2 ;;
esac
