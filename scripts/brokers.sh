#!/usr/bin/env bash
# Starts, stops and reports the extra brokers the cluster and version tests run against,
# all on loopback with ports and data directories of their own, so they never touch the
# machine's own RabbitMQ (5672) and NATS (4222):
#
#   scripts/brokers.sh <setup> <start|stop|status>
#   scripts/brokers.sh <setup> <action> [arguments]   (an action the setup adds, e.g. ctl)
#
# Each setup is one file in scripts/brokers/ (scripts/brokers/<setup>.sh) that defines
# the functions `start`, `stop` and `status` (and may define more actions, which the
# tests use to act on one node); `scripts/brokers.sh list` names them.
# `start` installs what it needs on a fresh machine (Debian or PyPI packages, a debootstrap
# root for a newer RabbitMQ) under $BROKERS_DIR, and is idempotent.
#
# BROKERS_DIR defaults to one directory per machine user (~/.cache/steadfast/brokers), not
# per checkout: the brokers listen on fixed ports, so their pid files and data must be
# found by every checkout on the machine (a second clone, CI's fresh clone) — a directory
# per checkout made a fresh clone start a second cluster on ports already taken. It also
# keeps the installs (nats-server venvs, the Debian root) between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export BROKERS_DIR="${BROKERS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/steadfast/brokers}"
mkdir -p "$BROKERS_DIR"

usage() {
  echo "usage: scripts/brokers.sh <setup> <start|stop|status>   (setups: $(list | tr '\n' ' '))" >&2
  exit 2
}
list() { find scripts/brokers -maxdepth 1 -name '*.sh' -printf '%f\n' | sed 's/\.sh$//' | sort; }

[ "${1:-}" = list ] && { list; exit 0; }
[ $# -ge 2 ] || usage
setup=$1 action=$2
shift 2
[ -f "scripts/brokers/$setup.sh" ] || usage
case "$action" in start | stop | status) [ $# -eq 0 ] || usage ;; esac
# shellcheck source=/dev/null
source "scripts/brokers/$setup.sh"
[ "$(type -t "$action")" = function ] || usage
"$action" "$@"
