#!/usr/bin/env bash
# Start/stop the two local servers (beanstalkd, nx-27017) by their pid files.
# Idempotent: a server already running from our pid file is reused; a port held by
# anything else stops us with a clear message instead of silently talking to a stranger.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DATA=${MAILER_DATA_DIR:-$ROOT/.data}
VENV=${VENV:-$ROOT/.venv}
BS_PORT=${MAILER_BEANSTALKD_PORT:-11300}
MONGO_PORT=${MAILER_MONGO_PORT:-27017}
BS_PID=$DATA/beanstalkd.pid
MONGO_PID=$DATA/mongo.pid

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port pidfile name output-file
  for _ in $(seq 1 100); do
    port_busy "$1" && return 0
    alive "$2" || { echo "services: $3 exited at start; its output ($4):" >&2; tail -5 "$4" >&2; return 1; }
    sleep 0.1
  done
  echo "services: $3 did not open 127.0.0.1:$1 within 10 s; see $4" >&2
  return 1
}

ensure_beanstalkd() {
  command -v beanstalkd >/dev/null 2>&1 && return 0
  echo "services: installing beanstalkd (apt-get)"
  if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock || true)" ] \
     || ! apt-cache show beanstalkd >/dev/null 2>&1; then
    apt-get update -qq
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq beanstalkd >/dev/null
}

start_beanstalkd() {
  if alive "$BS_PID"; then echo "services: beanstalkd already running (pid $(cat "$BS_PID"))"; return 0; fi
  if port_busy "$BS_PORT"; then
    echo "services: 127.0.0.1:$BS_PORT is taken by a process that is not our beanstalkd" \
         "(no live pid in $BS_PID). Stop it or set MAILER_BEANSTALKD_PORT." >&2
    return 1
  fi
  ensure_beanstalkd
  mkdir -p "$DATA/beanstalkd"
  # -b: binlog so a restart keeps the queue; -z: jobs up to 64 KiB (bodies are ids, but be generous).
  nohup beanstalkd -l 127.0.0.1 -p "$BS_PORT" -b "$DATA/beanstalkd" -z 65536 \
    >"$DATA/beanstalkd.log" 2>&1 &
  echo $! >"$BS_PID"
  wait_port "$BS_PORT" "$BS_PID" beanstalkd "$DATA/beanstalkd.log"
  echo "services: beanstalkd on 127.0.0.1:$BS_PORT (binlog $DATA/beanstalkd)"
}

start_mongo() {
  if alive "$MONGO_PID"; then echo "services: nx-27017 already running (pid $(cat "$MONGO_PID"))"; return 0; fi
  if port_busy "$MONGO_PORT"; then
    echo "services: 127.0.0.1:$MONGO_PORT is taken by a process that is not our nx-27017" \
         "(no live pid in $MONGO_PID). Stop it or set MAILER_MONGO_PORT." >&2
    return 1
  fi
  if [ ! -x "$VENV/bin/nx-27017" ]; then
    echo "services: $VENV/bin/nx-27017 is not installed; run 'make services' (it creates the venv first)" >&2
    return 1
  fi
  mkdir -p "$DATA/mongo"
  nohup "$VENV/bin/nx-27017" --data-dir "$DATA/mongo" --host 127.0.0.1 -p "$MONGO_PORT" \
    --log-file "$DATA/mongo.log" --pid-file "$DATA/mongo.inner.pid" >"$DATA/mongo.out" 2>&1 &
  echo $! >"$MONGO_PID"
  wait_port "$MONGO_PORT" "$MONGO_PID" nx-27017 "$DATA/mongo.out"
  echo "services: nx-27017 on 127.0.0.1:$MONGO_PORT (data $DATA/mongo)"
}

stop_one() { # pidfile name
  if alive "$1"; then
    local pid; pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    echo "services: stopped $2 (pid $pid)"
  else
    echo "services: $2 not running"
  fi
  rm -f "$1"
}

case "${1:-start}" in
  start) mkdir -p "$DATA"; start_beanstalkd; start_mongo ;;
  stop) stop_one "$BS_PID" beanstalkd; stop_one "$MONGO_PID" mongo ;;
  status)
    alive "$BS_PID" && echo "beanstalkd: running (pid $(cat "$BS_PID"))" || echo "beanstalkd: stopped"
    alive "$MONGO_PID" && echo "nx-27017: running (pid $(cat "$MONGO_PID"))" || echo "nx-27017: stopped" ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
