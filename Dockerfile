# syntax=docker/dockerfile:1
# A steadfast worker image: the container_worker example (examples/container_worker.rs)
# as the entry point, and the `steadfast` operations CLI beside it.
#   docker build -t steadfast-worker .
#   docker run --rm -e STEADFAST_BROKER_URL=amqp://guest:guest@rabbitmq:5672/%2f steadfast-worker
#   docker run --rm --entrypoint steadfast steadfast-worker --help
# Every setting is an environment variable (docs/operations.md has the table). Your own
# worker: put it in examples/ (or a binary of your crate), then
#   docker build --build-arg EXAMPLE=my_worker --build-arg FEATURES=cli,app,otlp .
# FEATURES must include what the example's `required-features` name; `cli` already
# brings amqp, nats, postgres and sqlite. CI replays this file's build stage offline
# (scripts/check-docker-context.sh), so a file missing from a COPY fails there first.

ARG RUST_VERSION=1.94

# ---- build ------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
ARG FEATURES=cli,app,otlp
ARG EXAMPLE=container_worker
WORKDIR /src

# Dependency layer: every workspace manifest and the lock file, with an empty file for
# every target they declare, so this slow layer is rebuilt only when dependencies change.
COPY Cargo.toml Cargo.lock ./
COPY macros/Cargo.toml macros/Cargo.toml
COPY fault/Cargo.toml fault/Cargo.toml
COPY docker/stub-targets.sh docker/stub-targets.sh
RUN sh docker/stub-targets.sh . macros fault \
 && cargo build --release --locked --features "${FEATURES}" --bin steadfast --example "${EXAMPLE}"

# The sources (.dockerignore keeps target/ and .git out). Copied files keep their own
# modification times, older than the stub build's outputs: touch them so cargo rebuilds.
COPY . .
RUN find src macros/src examples -name '*.rs' -exec touch {} + \
 && cargo build --release --locked --features "${FEATURES}" --bin steadfast --example "${EXAMPLE}" \
 && mkdir -p out \
 && cp "target/release/examples/${EXAMPLE}" out/worker \
 && cp target/release/steadfast out/steadfast

# ---- runtime ----------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 steadfast \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin steadfast
COPY --from=build /src/out/worker /usr/local/bin/worker
COPY --from=build /src/out/steadfast /usr/local/bin/steadfast
USER 10001:10001
ENV STEADFAST_HTTP_ADDR=0.0.0.0:9090 \
    STEADFAST_LOG_FORMAT=json \
    RUST_LOG=info
EXPOSE 9090
# Exec form: the worker is PID 1 and receives SIGTERM itself.
ENTRYPOINT ["/usr/local/bin/worker"]
