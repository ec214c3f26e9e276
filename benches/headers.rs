//! Decoding a delivery's headers is linear in their number.
//!
//! For 10, 100, 1,000 and 10,000 headers (`h00000: v00000` ...), in the same run:
//!
//! - `raw`: what the NATS client itself does with them, one `HeaderMap::insert` each;
//! - `steadfast`: [`Envelope::read_wire`] over that map, what both transports run for
//!   every delivery (CloudEvents attributes, attempt, the header limits, the headers
//!   kept). Past 1,000 headers the delivery is a defect (`limits::MAX_HEADERS`): every
//!   header is still read and counted, the first 1,000 kept.
//!
//! Linear: the time per header stays flat from 10 to 10,000.
//!
//! ```text
//! cargo bench --bench headers --features nats
//! ```

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::{borrow::Cow, hint::black_box};
use steadfast::{Envelope, MessageId};

fn pairs(n: usize) -> Vec<(String, String)> {
    let mut p = vec![
        ("ce-id".to_owned(), MessageId::new().to_string()),
        ("ce-type".to_owned(), "bench.headers".to_owned()),
    ];
    p.extend((0..n).map(|i| (format!("h{i:05}"), format!("v{i:05}"))));
    p
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_headers");
    for n in [10usize, 100, 1_000, 10_000] {
        let input = pairs(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("raw", n), &input, |b, input| {
            b.iter(|| {
                let mut h = async_nats::HeaderMap::new();
                for (k, v) in input {
                    h.insert(k.as_str(), v.as_str());
                }
                black_box(h)
            })
        });
        let mut map = async_nats::HeaderMap::new();
        for (k, v) in &input {
            map.insert(k.as_str(), v.as_str());
        }
        g.bench_with_input(BenchmarkId::new("steadfast", n), &map, |b, map| {
            b.iter(|| {
                let headers = map.iter().flat_map(|(k, vs)| {
                    vs.iter()
                        .map(move |v| (AsRef::<str>::as_ref(k), Cow::Borrowed(v.as_str())))
                });
                black_box(Envelope::read_wire(
                    "ce-",
                    headers,
                    None,
                    None,
                    bytes::Bytes::new(),
                ))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
