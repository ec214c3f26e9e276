#!/usr/bin/env bash
# Runs the benchmarks with the settings docs/benchmarks.md quotes, appends every figure
# to a result file (one JSON object a line: target/bench/results.jsonl, or
# BENCH_RESULTS), renders the plots into docs/bench/ and prints the page's tables.
#
#   scripts/bench.sh                 # everything, full size (about an hour on 2 cores)
#   scripts/bench.sh --quick         # a smoke run of everything (a few minutes)
#   scripts/bench.sh amqp latency    # some of: pipeline amqp nats storage latency soak
#   scripts/bench.sh --plots         # only render the plots and tables from the file
#
# Settings can be overridden by their variables (BENCH_ROUNDS, BENCH_MESSAGES,
# BENCH_SECS, BENCH_SOAK_MESSAGES, ...; each bench's header lists its own). AMQP_URL,
# NATS_URL and DATABASE_URL point the benches at other servers (a cluster, for
# instance: `AMQP_URL=amqp://guest:guest@127.0.0.1:5701/%2f scripts/bench.sh amqp`;
# on a NATS cluster, BENCH_NATS_REPLICAS=3 makes the benches' streams R3).
# Figures of one run share BENCH_RUN; compare figures of one run only.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
plots_only=0
benches=()
for a in "$@"; do
  case "$a" in
    --quick) quick=1 ;;
    --plots) plots_only=1 ;;
    pipeline | amqp | nats | storage | latency | soak) benches+=("$a") ;;
    *)
      echo "usage: $0 [--quick] [--plots] [pipeline|amqp|nats|storage|latency|soak]..." >&2
      exit 2
      ;;
  esac
done
[ ${#benches[@]} -gt 0 ] || benches=(pipeline amqp nats storage latency soak)

export BENCH_RESULTS="${BENCH_RESULTS:-$PWD/target/bench/results.jsonl}"
export BENCH_PLOTS="${BENCH_PLOTS:-$PWD/docs/bench}"
mkdir -p "$(dirname "$BENCH_RESULTS")"

plots() { cargo bench --quiet --all-features --bench plots; }
if [ "$plots_only" = 1 ]; then
  plots
  exit 0
fi

# shellcheck source=scripts/services.sh
. scripts/services.sh

suffix=""
[ "$quick" = 0 ] || suffix="-quick"
export BENCH_RUN="${BENCH_RUN:-$(date -u +%Y%m%dT%H%M%SZ)$suffix}"
# The brokers' processes (their CPU per message) and RabbitMQ's version (lapin does not
# show it). A cluster's nodes can be named in BENCH_BROKER_PID, comma-separated.
listener() { ss -ltnpH "sport = :$1" 2>/dev/null | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -n 1; }
amqp_port=$(sed -n 's#.*:\([0-9][0-9]*\)/.*#\1#p' <<<"${AMQP_URL:-amqp://x@127.0.0.1:5672/%2f}")
nats_port=$(sed -n 's#.*:\([0-9][0-9]*\)$#\1#p' <<<"${NATS_URL:-nats://127.0.0.1:4222}")
export BENCH_BROKER_PID="${BENCH_BROKER_PID:-$(listener "$amqp_port")}"
export BENCH_NATS_PID="${BENCH_NATS_PID:-$(listener "$nats_port")}"
[ -n "$BENCH_BROKER_PID" ] || unset BENCH_BROKER_PID
[ -n "$BENCH_NATS_PID" ] || unset BENCH_NATS_PID
if [ -z "${BENCH_RABBITMQ_VERSION:-}" ] && command -v rabbitmq-diagnostics >/dev/null; then
  BENCH_RABBITMQ_VERSION=$(timeout 30 rabbitmq-diagnostics -q server_version 2>/dev/null || echo unknown)
  export BENCH_RABBITMQ_VERSION
fi

# The settings the docs quote, and the quick ones.
set_default() { [ -n "${!1:-}" ] || export "$1=$2"; }
if [ "$quick" = 1 ]; then
  set_default BENCH_ROUNDS 1
  set_default BENCH_MESSAGES 5000
  set_default BENCH_SECS 3
  set_default BENCH_RATES 1000
  set_default BENCH_SOAK_MESSAGES 20000
  set_default BENCH_SHAPES 500x2d
  criterion_args=(-- --quick)
else
  set_default BENCH_ROUNDS 3
  set_default BENCH_SECS 15
  set_default BENCH_RATES 1000,5000
  set_default BENCH_SOAK_MESSAGES 1000000
  criterion_args=()
fi

echo "run $BENCH_RUN on $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); results in $BENCH_RESULTS"
for b in "${benches[@]}"; do
  echo "== $b (load $(cut -d' ' -f1-3 /proc/loadavg))"
  case "$b" in
    pipeline) cargo bench --all-features --bench pipeline "${criterion_args[@]}" ;;
    amqp) BENCH_MESSAGES="${BENCH_MESSAGES:-30000}" cargo bench --all-features --bench amqp ;;
    nats) BENCH_MESSAGES="${BENCH_MESSAGES:-50000}" cargo bench --all-features --bench nats ;;
    *) cargo bench --all-features --bench "$b" ;;
  esac
done
echo "== done (load $(cut -d' ' -f1-3 /proc/loadavg))"
plots
