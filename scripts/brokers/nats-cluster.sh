# shellcheck shell=bash
# A three-node NATS JetStream cluster of a current nats-server (2.15.x, installed by the
# nats-versions setup) on loopback: nodes sf-n1..sf-n3 with client ports 4251-4253,
# cluster (route) ports 6251-6253, cluster name `sf-nats`, each with its own configuration,
# store and log under $BROKERS_DIR/nats-cluster/. Lame-duck mode lasts 30 s here (the
# least the server allows; 2 min by default) so the tests that use it stay short.
#
#   scripts/brokers.sh nats-cluster start        # starts the missing nodes (a killed node
#                                                # comes back on its store and catches up)
#   scripts/brokers.sh nats-cluster stop         # stops all three and removes their stores
#   scripts/brokers.sh nats-cluster status
#   scripts/brokers.sh nats-cluster pid <n>      # node n's process, for kill -KILL/-STOP
#   scripts/brokers.sh nats-cluster ldm <n>      # puts node n in lame-duck mode
#
# The tests reach it as nats://127.0.0.1:4251,nats://127.0.0.1:4252,nats://127.0.0.1:4253.

NC_DIR="$BROKERS_DIR/nats-cluster"
NC_VERSION=2.15.1
NC_NODES=(1 2 3)

nc_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
nc_bin() { echo "$BROKERS_DIR/nats-$NC_VERSION/bin/nats-server"; }

nc_install() {
  [ -x "$(nc_bin)" ] && return 0
  bash scripts/brokers.sh nats-versions bin "$NC_VERSION" >/dev/null
}

nc_configure() {
  local n d
  for n in "${NC_NODES[@]}"; do
    d="$NC_DIR/sf-n$n"
    mkdir -p "$d/store"
    cat >"$d/server.conf" <<CONF
server_name: sf-n$n
listen: 127.0.0.1:$((4250 + n))
jetstream { store_dir: "$d/store" }
lame_duck_duration: "30s"
lame_duck_grace_period: "2s"
cluster {
  name: sf-nats
  listen: 127.0.0.1:$((6250 + n))
  routes: [ nats-route://127.0.0.1:6251, nats-route://127.0.0.1:6252, nats-route://127.0.0.1:6253 ]
}
CONF
  done
}

pid() {
  local n=${1:?usage: pid <1|2|3>}
  echo "$(cat "$NC_DIR/sf-n$n/pid")"
}

ldm() {
  local n=${1:?usage: ldm <1|2|3>}
  "$(nc_bin)" --signal "ldm=$(pid "$n")"
}

# Waits until each client port is open and the JetStream meta group has a leader (a
# node's log says so).
nc_await() {
  local n i
  for n in "${NC_NODES[@]}"; do
    for ((i = 0; i < 150; i++)); do nc_port_open $((4250 + n)) && break; sleep 0.2; done
    nc_port_open $((4250 + n)) || { echo "nats-cluster: sf-n$n does not listen" >&2; tail -20 "$NC_DIR/sf-n$n/server.log" >&2; return 1; }
  done
  for ((i = 0; i < 150; i++)); do
    grep -qs "JetStream cluster new metadata leader\|Self is new JetStream cluster metadata leader" "$NC_DIR"/sf-n*/server.log && return 0
    sleep 0.2
  done
  echo "nats-cluster: no JetStream metadata leader after 30 s" >&2
  return 1
}

start() {
  nc_install
  nc_configure
  local n
  for n in "${NC_NODES[@]}"; do
    nc_port_open $((4250 + n)) && continue
    echo "nats-cluster: starting sf-n$n (nats-server $NC_VERSION) on 127.0.0.1:$((4250 + n))" >&2
    setsid "$(nc_bin)" -c "$NC_DIR/sf-n$n/server.conf" -P "$NC_DIR/sf-n$n/pid" \
      -l "$NC_DIR/sf-n$n/server.log" </dev/null >/dev/null 2>&1 &
  done
  nc_await
  status
}

stop() {
  local n p
  for n in "${NC_NODES[@]}"; do
    p=$(cat "$NC_DIR/sf-n$n/pid" 2>/dev/null || true)
    [ -n "$p" ] && { kill -CONT "$p" 2>/dev/null; kill -KILL "$p" 2>/dev/null; } || true
  done
  rm -rf "$NC_DIR"
  echo "nats-cluster: stopped"
}

status() {
  local n ok=0
  for n in "${NC_NODES[@]}"; do
    if nc_port_open $((4250 + n)); then
      echo "nats-cluster: sf-n$n on 127.0.0.1:$((4250 + n)) (routes on $((6250 + n)))"
    else
      echo "nats-cluster: sf-n$n not running"
      ok=1
    fi
  done
  return $ok
}
