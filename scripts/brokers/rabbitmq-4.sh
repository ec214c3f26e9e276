# shellcheck shell=bash
# RabbitMQ 4.0.5 (Debian trixie's package, Erlang 27) on 127.0.0.1:5710, from a
# `debootstrap --variant=minbase trixie` root under $BROKERS_DIR/rabbitmq-4/root, so it runs
# beside the machine's own RabbitMQ without touching it: its own node name (sf-r4@localhost),
# distribution port (25710), epmd port (ERL_EPMD_PORT=4370), cookie and data directory.
#
#   scripts/brokers.sh rabbitmq-4 start    # installs on first use (~45 s), then ~10 s
#   scripts/brokers.sh rabbitmq-4 ctl <rabbitmqctl arguments>
#
# The tests reach it as amqp://guest:guest@127.0.0.1:5710/%2f (guest may log in over
# loopback).

R4_DIR="$BROKERS_DIR/rabbitmq-4"
R4_ROOT="$R4_DIR/root"
R4_NODE=sf-r4@localhost
R4_PORT=5710
R4_DIST_PORT=25710
R4_EPMD_PORT=4370
R4_HOME=/var/lib/sf-r4 # inside the root

r4_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Runs a command inside the root, as root, with the node's environment only.
r4_run() { chroot "$R4_ROOT" /usr/bin/env -i "${R4_ENV[@]}" "$@"; }
R4_ENV=(
  PATH=/usr/lib/rabbitmq/bin:/usr/sbin:/usr/bin:/sbin:/bin
  HOME="$R4_HOME" LANG=C.UTF-8 LC_ALL=C.UTF-8
  RABBITMQ_NODENAME="$R4_NODE"
  RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$R4_PORT"
  RABBITMQ_DIST_PORT="$R4_DIST_PORT"
  ERL_EPMD_PORT="$R4_EPMD_PORT" ERL_EPMD_ADDRESS=127.0.0.1
  RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  RABBITMQ_CONFIG_FILE="$R4_HOME/rabbitmq.conf"
  RABBITMQ_CONF_ENV_FILE="$R4_HOME/rabbitmq-env.conf"
  RABBITMQ_ENABLED_PLUGINS_FILE="$R4_HOME/enabled_plugins"
  RABBITMQ_MNESIA_BASE="$R4_HOME/mnesia" RABBITMQ_LOG_BASE="$R4_HOME/log"
  RABBITMQ_PID_FILE="$R4_HOME/pid"
)

ctl() { r4_run rabbitmqctl -n "$R4_NODE" "$@"; }

r4_install() {
  [ -f "$R4_ROOT/.steadfast-ready" ] && return 0
  if ! command -v debootstrap >/dev/null; then
    echo "rabbitmq-4: installing debootstrap" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  mkdir -p "$R4_DIR"
  local tmp="$R4_DIR/root.tmp"
  r4_unmount "$tmp"
  rm -rf --one-file-system "$tmp"
  echo "rabbitmq-4: building a Debian trixie root (debootstrap, ~30 s)" >&2
  debootstrap --variant=minbase trixie "$tmp" >"$R4_DIR/debootstrap.log" 2>&1 ||
    { tail -20 "$R4_DIR/debootstrap.log" >&2; return 1; }
  # Packages must not start services (there is no init in the root).
  printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
  chmod +x "$tmp/usr/sbin/policy-rc.d"
  echo "rabbitmq-4: installing rabbitmq-server in the root (~15 s)" >&2
  chroot "$tmp" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends rabbitmq-server' \
    >"$R4_DIR/install.log" 2>&1 || { tail -20 "$R4_DIR/install.log" >&2; return 1; }
  touch "$tmp/.steadfast-ready"
  r4_unmount "$R4_ROOT"
  rm -rf --one-file-system "$R4_ROOT"
  mv "$tmp" "$R4_ROOT"
}

# The node reads its memory use from /proc.
r4_mount() { mountpoint -q "$R4_ROOT/proc" || mount -t proc proc "$R4_ROOT/proc"; }
r4_unmount() { ! mountpoint -q "$1/proc" || umount -l "$1/proc"; }

r4_configure() {
  local home="$R4_ROOT$R4_HOME"
  mkdir -p "$home/log" "$home/mnesia"
  [ -f "$home/.erlang.cookie" ] || { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$home/.erlang.cookie"; }
  chmod 400 "$home/.erlang.cookie"
  printf 'listeners.tcp.local = 127.0.0.1:%s\nloopback_users.guest = true\n' "$R4_PORT" >"$home/rabbitmq.conf"
  : >"$home/rabbitmq-env.conf"
  echo '[].' >"$home/enabled_plugins"
}

# Waits up to 90 s for the node to say it has booted (it registers with epmd a moment
# after it is launched, and await_startup fails at once before that).
r4_await() {
  local i
  for ((i = 0; i < 45; i++)); do
    ctl -q await_startup --timeout 30 >/dev/null 2>&1 && return 0
    sleep 2
  done
  return 1
}

start() {
  r4_install
  r4_configure
  r4_mount
  if ! r4_port_open "$R4_PORT"; then
    echo "rabbitmq-4: starting $R4_NODE on 127.0.0.1:$R4_PORT" >&2
    setsid chroot "$R4_ROOT" /usr/bin/env -i "${R4_ENV[@]}" rabbitmq-server \
      >"$R4_DIR/server.log" 2>&1 </dev/null &
  fi
  if ! r4_await; then
    echo "rabbitmq-4: the node did not start; last lines of its log:" >&2
    tail -30 "$R4_DIR/server.log" >&2
    return 1
  fi
  echo "rabbitmq-4: $R4_NODE up on amqp://127.0.0.1:$R4_PORT ($(ctl -q version 2>/dev/null))"
}

stop() {
  [ -d "$R4_ROOT" ] || return 0
  if r4_port_open "$R4_PORT" || [ -s "$R4_ROOT$R4_HOME/pid" ]; then
    ctl -q stop >/dev/null 2>&1 || true
  fi
  # The epmd on 4370 was started by this node and outlives it; it serves no other node.
  r4_run epmd -kill >/dev/null 2>&1 || true
  r4_unmount "$R4_ROOT"
  echo "rabbitmq-4: stopped"
}

status() {
  if r4_port_open "$R4_PORT" && ctl -q status >/dev/null 2>&1; then
    echo "rabbitmq-4: running ($R4_NODE on 127.0.0.1:$R4_PORT, version $(ctl -q version 2>/dev/null))"
  else
    echo "rabbitmq-4: not running"
    return 1
  fi
}
