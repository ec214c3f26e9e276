# shellcheck shell=bash
# A three-node RabbitMQ cluster from the machine's own rabbitmq-server package, on loopback
# beside the machine's node (5672), which it never touches: nodes sf-c1@localhost,
# sf-c2@localhost and sf-c3@localhost, AMQP on 127.0.0.1:5701-5703, distribution on
# 25701-25703, each with its own configuration, data and log directory under
# $BROKERS_DIR/rabbitmq-cluster/, one Erlang cookie for the three and the CLI.
#
#   scripts/brokers.sh rabbitmq-cluster start      # starts the missing nodes, joins new ones
#   scripts/brokers.sh rabbitmq-cluster stop       # stops all three and forgets the cluster
#   scripts/brokers.sh rabbitmq-cluster status
#   scripts/brokers.sh rabbitmq-cluster ctl <n> <rabbitmqctl arguments>   (n = 1, 2 or 3)
#   scripts/brokers.sh rabbitmq-cluster pid <n>    # the node's Erlang VM, for kill -STOP/-KILL
#
# `start` after a node was killed starts that node again on its old data: it rejoins the
# cluster by itself. The tests reach the nodes as amqp://guest:guest@127.0.0.1:570N/%2f.

RC_DIR="$BROKERS_DIR/rabbitmq-cluster"
RC_NODES=(1 2 3)

rc_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
rc_node() { echo "sf-c$1@localhost"; }
rc_amqp_port() { echo $((5700 + $1)); }

rc_install() {
  command -v rabbitmq-server >/dev/null && [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && return 0
  echo "rabbitmq-cluster: installing rabbitmq-server" >&2
  apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
}

# Runs a RabbitMQ command as node n, with that node's environment only (not the machine's
# /etc/rabbitmq files, which describe the node on 5672).
rc_run() {
  local n=$1 d="$RC_DIR/sf-c$1"
  shift
  env -i PATH=/usr/lib/rabbitmq/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME="$RC_DIR/home" LANG=C.UTF-8 LC_ALL=C.UTF-8 \
    RABBITMQ_NODENAME="$(rc_node "$n")" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$(rc_amqp_port "$n")" \
    RABBITMQ_DIST_PORT=$((25700 + n)) \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" \
    RABBITMQ_PID_FILE="$d/pid" \
    "$@"
}

ctl() {
  local n=${1:?usage: ctl <1|2|3> <rabbitmqctl arguments>}
  shift
  rc_run "$n" rabbitmqctl -n "$(rc_node "$n")" "$@"
}

pid() {
  local n=${1:?usage: pid <1|2|3>}
  echo "$(cat "$RC_DIR/sf-c$n/pid")"
}

rc_configure() {
  local n d
  mkdir -p "$RC_DIR/home"
  if [ ! -f "$RC_DIR/home/.erlang.cookie" ]; then
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$RC_DIR/home/.erlang.cookie"
    chmod 400 "$RC_DIR/home/.erlang.cookie"
  fi
  for n in "${RC_NODES[@]}"; do
    d="$RC_DIR/sf-c$n"
    mkdir -p "$d/mnesia" "$d/log"
    printf 'listeners.tcp.local = 127.0.0.1:%s\nloopback_users.guest = true\n' \
      "$(rc_amqp_port "$n")" >"$d/rabbitmq.conf"
    : >"$d/rabbitmq-env.conf"
    echo '[].' >"$d/enabled_plugins"
  done
}

# Waits up to 120 s for node n to have booted (a node on old data waits for its peers).
rc_await() {
  local i
  for ((i = 0; i < 60; i++)); do
    ctl "$1" -q await_startup --timeout 30 >/dev/null 2>&1 && return 0
    sleep 2
  done
  echo "rabbitmq-cluster: $(rc_node "$1") did not start; last lines of its log:" >&2
  tail -30 "$RC_DIR/sf-c$1/server.log" >&2
  return 1
}

rc_running_nodes() { # as node n sees them
  ctl "$1" -q cluster_status --formatter json 2>/dev/null |
    grep -o '"running_nodes":\[[^]]*\]' | grep -o 'sf-c[0-9]@localhost' | sort | tr '\n' ' '
}

start() {
  rc_install
  rc_configure
  local n p
  # A node left paused (a test stopped before it could resume it) runs again.
  for n in "${RC_NODES[@]}"; do
    p=$(cat "$RC_DIR/sf-c$n/pid" 2>/dev/null || true)
    [ -n "$p" ] && kill -CONT "$p" 2>/dev/null || true
  done
  for n in "${RC_NODES[@]}"; do
    if ! rc_port_open "$(rc_amqp_port "$n")"; then
      echo "rabbitmq-cluster: starting $(rc_node "$n") on 127.0.0.1:$(rc_amqp_port "$n")" >&2
      # From its own directory: a node keeps the working directory it starts in, and
      # rabbitmqctl stop_app fails on a node whose directory was deleted (a CI clone's).
      (cd "$RC_DIR/sf-c$n" && rc_run "$n" setsid rabbitmq-server) \
        >"$RC_DIR/sf-c$n/server.log" 2>&1 </dev/null &
    fi
  done
  for n in "${RC_NODES[@]}"; do rc_await "$n"; done
  for n in "${RC_NODES[@]:1}"; do
    if ! rc_running_nodes "$n" | grep -q "$(rc_node 1)"; then
      echo "rabbitmq-cluster: $(rc_node "$n") joins $(rc_node 1)" >&2
      ctl "$n" -q stop_app >/dev/null
      ctl "$n" -q join_cluster "$(rc_node 1)" >/dev/null
      ctl "$n" -q start_app >/dev/null
    fi
  done
  status
}

stop() {
  local n p
  for n in "${RC_NODES[@]}"; do
    [ -d "$RC_DIR/sf-c$n" ] || continue
    p=$(cat "$RC_DIR/sf-c$n/pid" 2>/dev/null || true)
    # A paused node must run again to stop.
    [ -n "$p" ] && kill -CONT "$p" 2>/dev/null || true
    ctl "$n" -q stop --timeout 30 >/dev/null 2>&1 || { [ -n "$p" ] && kill -KILL "$p" 2>/dev/null; } || true
  done
  # A later start makes a new cluster.
  for n in "${RC_NODES[@]}"; do rm -rf "$RC_DIR/sf-c$n"; done
  echo "rabbitmq-cluster: stopped"
}

status() {
  local n ok=0 seen
  for n in "${RC_NODES[@]}"; do
    if rc_port_open "$(rc_amqp_port "$n")" && seen=$(rc_running_nodes "$n") && [ -n "$seen" ]; then
      echo "rabbitmq-cluster: $(rc_node "$n") on 127.0.0.1:$(rc_amqp_port "$n") sees running: $seen"
    else
      echo "rabbitmq-cluster: $(rc_node "$n") not running"
      ok=1
    fi
  done
  return $ok
}
