#!/usr/bin/env bash
# The project's test command (README, .ci/run): makes sure RabbitMQ, NATS JetStream,
# PostgreSQL and MariaDB answer on 127.0.0.1 — starting the local servers where it can, or that
# service of docker-compose.yml on a laptop with Docker — then runs the whole suite with the one
# feature set CI uses. Test binaries named `*_faults` stop or restart shared servers, so
# they run last, alone and one test at a time.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/services.sh
. scripts/services.sh

# Current nats-servers (2.12 on 4262, 2.15 on 4265) and a three-node NATS cluster
# (4251-4253) of the project's own, installed on a fresh machine and stopped again
# however the run ends (scripts/brokers/).
nats_brokers_stop() {
  scripts/brokers.sh nats-versions stop >/dev/null 2>&1 || true
  scripts/brokers.sh nats-cluster stop >/dev/null 2>&1 || true
  scripts/brokers.sh rabbitmq-4 stop >/dev/null 2>&1 || true
  scripts/brokers.sh rabbitmq-cluster stop >/dev/null 2>&1 || true
}
# How long each stage took, printed at the end however the run ends, so a CI log's last
# lines show where its time went.
stage_times=()
stage_start=$SECONDS
stage() { # name: closes the previous stage and opens the next
  if [ -n "${stage_name:-}" ]; then stage_times+=("$((SECONDS - stage_start)) s  $stage_name"); fi
  stage_name=$1 stage_start=$SECONDS
}
on_exit() {
  local rc=$?
  stage ""
  nats_brokers_stop
  echo "scripts/test.sh: stage times (exit $rc, $SECONDS s in all):"
  printf '  %s\n' "${stage_times[@]}"
}
trap on_exit EXIT
stage "extra brokers (install and start), Chromium"
# Headless Chromium and its WebDriver for the console's browser test.
scripts/install-chromium.sh
scripts/brokers.sh nats-versions start
scripts/brokers.sh nats-cluster start
# RabbitMQ 4.0.5 (127.0.0.1:5710, from a Debian trixie root) for the version run below,
# and the three-node RabbitMQ cluster (5701-5703) of rabbitmq_cluster_faults.
scripts/brokers.sh rabbitmq-4 start
scripts/brokers.sh rabbitmq-cluster start
export CLUSTER_N="${CLUSTER_N:-2000}"
AMQP_4_URL="amqp://guest:guest@127.0.0.1:5710/%2f"
# The NATS transport tests and the conformance suite run again on each current server
# (the silent-server test, which waits out pings, only on the machine's).
nats_versions=(2.12.8 2.15.1)
nats_env() { # version
  echo "STEADFAST_TEST_NATS_URL=$(scripts/brokers.sh nats-versions url "$1")" \
    "STEADFAST_TEST_NATS_SERVER=$(scripts/brokers.sh nats-versions bin "$1")"
}

export RUST_BACKTRACE=1
# Fault binaries: tests/<name>_faults/ of the library, fault/tests/<name>_faults.rs of the
# fault suite (steadfast-fault); nextest's binary() names them <name>_faults either way.
faults=$(find tests -mindepth 1 -maxdepth 1 -type d -name '*_faults' -printf '%f\n' | sort)
suite_faults=$(find fault/tests -mindepth 1 -maxdepth 1 -name '*_faults.rs' -printf '%f\n' | sed 's/\.rs$//' | sort)
if cargo nextest --version >/dev/null 2>&1; then
  if [ -n "$faults$suite_faults" ]; then
    stage "build the tests"
    cargo nextest run --workspace --all-features --no-run
    stage "tests (not *_faults)"
    cargo nextest run --workspace --all-features --no-tests=pass -E 'not binary(/_faults$/)'
    for v in "${nats_versions[@]}"; do
      stage "nats tests on nats-server $v"
      env $(nats_env "$v") cargo nextest run --all-features --test nats -E 'not test(/silent/)'
    done
    # The RabbitMQ tests and the conformance suite again, on RabbitMQ 4.0.5.
    stage "amqp tests on RabbitMQ 4.0.5"
    AMQP_URL="$AMQP_4_URL" cargo nextest run --all-features --test amqp
    # Every fault test runs even when one fails, so one CI log shows them all.
    stage "*_faults (one at a time)"
    cargo nextest run --workspace --all-features --no-tests=pass -E 'binary(/_faults$/)' --test-threads 1 --no-fail-fast
  else
    cargo nextest run --workspace --all-features --no-tests=pass
  fi
else
  # Without nextest: name every test target except the *_faults ones.
  targets=()
  for t in $(find tests -mindepth 1 -maxdepth 1 \( -type d -o -name '*.rs' \) -printf '%f\n' | sed 's/\.rs$//' | sort); do
    case "$t" in *_faults) ;; *) targets+=(--test "$t") ;; esac
  done
  cargo test --all-features -p steadfast --lib --examples "${targets[@]}"
  for v in "${nats_versions[@]}"; do
    env $(nats_env "$v") cargo test --all-features --test nats -- --skip silent
  done
  AMQP_URL="$AMQP_4_URL" cargo test --all-features --test amqp
  cargo test --all-features -p steadfast-macros
  cargo test --all-features -p steadfast-fault --lib --bins
  for f in $faults; do cargo test --all-features --test "$f" -- --test-threads 1; done
  for f in $suite_faults; do cargo test --all-features -p steadfast-fault --test "$f" -- --test-threads 1; done
fi
stage "doc tests"
cargo test --workspace --all-features --doc
# The CLI as `cargo install steadfast --features cli` builds it: the cli feature without
# the others (console, http, otel, ...). Checked only, reusing the lint run's artifacts.
stage "cargo check --features cli alone"
cargo check -p steadfast --features cli --lib --bins
stage "documented commands, container and deployment checks"
# Every command README.md and docs/ show: the examples run (the binaries the tests built),
# the CLI's lines parsed by the binary and exercised by its tests, the rest traced to
# the CI step that runs it.
scripts/check-doc-commands.py
# The container and deployment files, offline: the Dockerfile's build stage replayed
# from its build context, the manifests and the compose file against their schemas.
scripts/check-docker-context.py
scripts/validate-deploy.sh
echo "scripts/test.sh: all tests passed"
