# syntax=docker/dockerfile:1
# The container_worker example (examples/container_worker.rs) as an image:
#   docker build -t steadfast-worker .
#   docker run --rm -e STEADFAST_BROKER_URL=amqp://guest:guest@rabbitmq:5672/%2f steadfast-worker
# Every setting is an environment variable (docs/operations.md has the table).

ARG RUST_VERSION=1.94
ARG FEATURES=amqp,nats,postgres,http,otel

# ---- build ------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
ARG FEATURES
WORKDIR /src

# Dependency layer: only the manifests and lock file, with an empty stub for every
# target, so this layer (the slow part) is rebuilt only when dependencies change.
COPY Cargo.toml Cargo.lock ./
COPY macros/Cargo.toml macros/Cargo.toml
COPY docker/stub-targets.sh docker/stub-targets.sh
RUN mkdir -p src macros/src \
 && touch src/lib.rs macros/src/lib.rs \
 && sh docker/stub-targets.sh \
 && cargo build --release --locked --features "${FEATURES}" --example container_worker

# The sources. Their files may be older than the stub build's outputs, so touch them:
# cargo compares modification times.
COPY macros macros
COPY src src
COPY sql sql
COPY docs docs
COPY examples examples
COPY README.md README.md
RUN touch src/lib.rs macros/src/lib.rs examples/container_worker.rs \
 && cargo build --release --locked --features "${FEATURES}" --example container_worker \
 && cp target/release/examples/container_worker /container_worker

# ---- runtime ----------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 steadfast \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin steadfast
COPY --from=build /container_worker /usr/local/bin/container_worker
USER 10001:10001
ENV STEADFAST_HTTP_ADDR=0.0.0.0:9090 \
    STEADFAST_LOG_FORMAT=json \
    RUST_LOG=info
EXPOSE 9090
# Exec form: the worker is PID 1 and receives SIGTERM itself.
ENTRYPOINT ["/usr/local/bin/container_worker"]
