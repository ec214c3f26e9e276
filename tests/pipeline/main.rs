//! The pipeline on the in-memory transport: the conformance suite, plus the cases that
//! need tokio's paused clock (exact delays).

mod paused;

use std::sync::Arc;
use steadfast::{
    testing::conformance::TransportFactory,
    transport::{Transport, memory::MemoryTransport},
};

struct Memory;

impl TransportFactory for Memory {
    fn create<'a>(&'a self, _case: &'a str) -> futures::future::BoxFuture<'a, Arc<dyn Transport>> {
        Box::pin(async { Arc::new(MemoryTransport::new()) as Arc<dyn Transport> })
    }
}

steadfast::conformance_tests!(memory_conformance, crate::Memory);
