//! Workers in containers: the `container_worker` example run as a process with its
//! configuration in the environment (readiness, `/metrics`, SIGTERM drain and exit 0,
//! bad configuration, a canary password), W3C trace context carried from a producer
//! into the worker's span through RabbitMQ and through NATS, OTLP export to a receiver,
//! and the `/metrics` of a real run against the documented sample and the dashboard.

mod metrics;
mod otlp;
mod process;
mod support;
mod trace;
