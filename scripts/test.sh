#!/usr/bin/env bash
# The project's test command (README, .ci/run): makes sure RabbitMQ, NATS JetStream and
# PostgreSQL answer on 127.0.0.1 — starting the local servers where it can, or that
# service of docker-compose.yml on a laptop with Docker — then runs the whole suite with the one
# feature set CI uses. Test binaries named `*_faults` stop or restart shared servers, so
# they run last, alone and one test at a time.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/services.sh
. scripts/services.sh

export RUST_BACKTRACE=1
# Fault binaries: tests/<name>_faults/ of the library, fault/tests/<name>_faults.rs of the
# fault suite (steadfast-fault); nextest's binary() names them <name>_faults either way.
faults=$(find tests -mindepth 1 -maxdepth 1 -type d -name '*_faults' -printf '%f\n' | sort)
suite_faults=$(find fault/tests -mindepth 1 -maxdepth 1 -name '*_faults.rs' -printf '%f\n' | sed 's/\.rs$//' | sort)
if cargo nextest --version >/dev/null 2>&1; then
  if [ -n "$faults$suite_faults" ]; then
    cargo nextest run --workspace --all-features --no-tests=pass -E 'not binary(/_faults$/)'
    cargo nextest run --workspace --all-features --no-tests=pass -E 'binary(/_faults$/)' --test-threads 1
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
  cargo test --all-features -p steadfast-macros
  cargo test --all-features -p steadfast-fault --lib --bins
  for f in $faults; do cargo test --all-features --test "$f" -- --test-threads 1; done
  for f in $suite_faults; do cargo test --all-features -p steadfast-fault --test "$f" -- --test-threads 1; done
fi
cargo test --workspace --all-features --doc
# Every example that needs no broker runs to completion.
cargo run --all-features --quiet --example quickstart >/dev/null
# The container and deployment files, offline: the Dockerfile's build stage replayed
# from its build context, the manifests and the compose file against their schemas.
scripts/check-docker-context.py
scripts/validate-deploy.sh
echo "scripts/test.sh: all tests passed"
