//! Workers in containers: the `container_worker` example run as a process with its
//! configuration in the environment (readiness, `/metrics`, SIGTERM drain and exit 0,
//! bad configuration, a canary password), and W3C trace context carried from a producer
//! into the worker's span through RabbitMQ and through NATS.

mod process;
mod support;
mod trace;
