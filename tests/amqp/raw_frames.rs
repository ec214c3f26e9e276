//! A minimal AMQP 0-9-1 publisher written frame by frame, for messages no client library
//! will serialize (lapin's own encoder recurses too, so a header table nested 10,000
//! deep would overflow the test's stack before it reached the broker). It speaks just
//! enough of the protocol to publish one message with publisher confirms.

use lapin::uri::AMQPUri;
use std::time::Duration;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// An AMQP field value, already encoded (type tag and bytes).
#[derive(Clone, Debug)]
pub(crate) struct Value(Vec<u8>);

impl Value {
    /// A long string (`S`).
    pub(crate) fn text(s: &str) -> Self {
        let mut v = vec![b'S'];
        long(&mut v, s.as_bytes());
        Self(v)
    }

    /// `leaf` wrapped in `depth` tables (`{"n": {"n": ... leaf}}`) or arrays
    /// (`[[... leaf]]`), built inside out without recursion.
    pub(crate) fn nested(depth: usize, arrays: bool, leaf: Value) -> Self {
        let mut cur = leaf.0;
        for _ in 0..depth {
            let mut next = Vec::with_capacity(cur.len() + 7);
            if arrays {
                next.push(b'A');
                long(&mut next, &cur);
            } else {
                let mut body = vec![1, b'n'];
                body.extend_from_slice(&cur);
                next.push(b'F');
                long(&mut next, &body);
            }
            cur = next;
        }
        Self(cur)
    }
}

fn long(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
    out.extend_from_slice(bytes);
}

fn short(out: &mut Vec<u8>, s: &str) {
    out.push(u8::try_from(s.len()).unwrap());
    out.extend_from_slice(s.as_bytes());
}

fn table_body(entries: &[(&str, Value)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in entries {
        short(&mut body, k);
        body.extend_from_slice(&v.0);
    }
    body
}

/// What to publish: headers (in this order), the optional `message_id` and `type`
/// properties, and the body.
#[derive(Debug, Default)]
pub(crate) struct RawMessage {
    pub(crate) headers: Vec<(String, Value)>,
    pub(crate) message_id: Option<String>,
    pub(crate) kind: Option<String>,
    pub(crate) body: Vec<u8>,
}

struct Conn {
    stream: TcpStream,
    frame_max: u32,
}

impl Conn {
    async fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        let mut f = vec![kind];
        f.extend_from_slice(&channel.to_be_bytes());
        long(&mut f, payload);
        f.push(0xCE);
        self.stream.write_all(&f).await.expect("raw write");
    }

    async fn method(&mut self, channel: u16, class: u16, method: u16, args: &[u8]) {
        let mut p = Vec::new();
        p.extend_from_slice(&class.to_be_bytes());
        p.extend_from_slice(&method.to_be_bytes());
        p.extend_from_slice(args);
        self.send(1, channel, &p).await;
    }

    /// The next method frame as (class, method, arguments), heartbeats skipped.
    async fn recv(&mut self) -> (u16, u16, Vec<u8>) {
        loop {
            let mut head = [0u8; 7];
            self.stream.read_exact(&mut head).await.expect("raw read");
            let size = u32::from_be_bytes(head[3..7].try_into().unwrap()) as usize;
            let mut payload = vec![0u8; size + 1];
            self.stream
                .read_exact(&mut payload)
                .await
                .expect("raw read");
            payload.pop();
            if head[0] == 1 {
                let class = u16::from_be_bytes([payload[0], payload[1]]);
                let method = u16::from_be_bytes([payload[2], payload[3]]);
                return (class, method, payload[4..].to_vec());
            }
        }
    }

    async fn expect(&mut self, class: u16, method: u16) -> Vec<u8> {
        let (c, m, args) = self.recv().await;
        if (c, m) == (20, 40) || (c, m) == (10, 50) {
            let text_len = args[2] as usize;
            panic!(
                "the broker closed the {}: {}",
                if c == 20 { "channel" } else { "connection" },
                String::from_utf8_lossy(&args[3..3 + text_len])
            );
        }
        assert_eq!((c, m), (class, method), "unexpected AMQP method");
        args
    }
}

/// Publishes `msg` to `exchange` with `routing_key` (mandatory) over a connection of its
/// own, and waits for the broker's confirm. Panics when the broker refuses it.
pub(crate) async fn publish(url: &str, exchange: &str, routing_key: &str, msg: &RawMessage) {
    tokio::time::timeout(
        Duration::from_secs(20),
        publish_inner(url, exchange, routing_key, msg),
    )
    .await
    .expect("raw publish timed out");
}

async fn publish_inner(url: &str, exchange: &str, routing_key: &str, msg: &RawMessage) {
    let uri: AMQPUri = url.parse().expect("AMQP URL");
    let stream = TcpStream::connect((uri.authority.host.as_str(), uri.authority.port))
        .await
        .expect("raw TCP connect");
    let mut c = Conn {
        stream,
        frame_max: 4096,
    };
    c.stream
        .write_all(b"AMQP\x00\x00\x09\x01")
        .await
        .expect("raw write");
    c.expect(10, 10).await; // start
    let mut start_ok = Vec::new();
    long(&mut start_ok, &[]); // client properties
    short(&mut start_ok, "PLAIN");
    let user = &uri.authority.userinfo;
    long(
        &mut start_ok,
        format!("\0{}\0{}", user.username, user.password).as_bytes(),
    );
    short(&mut start_ok, "en_US");
    c.method(0, 10, 11, &start_ok).await;
    let tune = c.expect(10, 30).await;
    c.frame_max = u32::from_be_bytes(tune[2..6].try_into().unwrap());
    let mut tune_ok = Vec::new();
    tune_ok.extend_from_slice(&tune[0..2]);
    tune_ok.extend_from_slice(&c.frame_max.to_be_bytes());
    tune_ok.extend_from_slice(&0u16.to_be_bytes());
    c.method(0, 10, 31, &tune_ok).await;
    let mut open = Vec::new();
    short(&mut open, &uri.vhost);
    short(&mut open, "");
    open.push(0);
    c.method(0, 10, 40, &open).await;
    c.expect(10, 41).await;
    c.method(1, 20, 10, &[0]).await;
    c.expect(20, 11).await;
    c.method(1, 85, 10, &[0]).await; // confirm.select
    c.expect(85, 11).await;

    let mut publish = vec![0, 0];
    short(&mut publish, exchange);
    short(&mut publish, routing_key);
    publish.push(1); // mandatory
    c.method(1, 60, 40, &publish).await;
    let mut header = Vec::new();
    header.extend_from_slice(&60u16.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(msg.body.len() as u64).to_be_bytes());
    let mut flags: u16 = (1 << 13) | (1 << 12); // headers, delivery mode
    if msg.message_id.is_some() {
        flags |= 1 << 7;
    }
    if msg.kind.is_some() {
        flags |= 1 << 5;
    }
    header.extend_from_slice(&flags.to_be_bytes());
    let entries: Vec<(&str, Value)> = msg
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    long(&mut header, &table_body(&entries));
    header.push(2); // persistent
    if let Some(id) = &msg.message_id {
        short(&mut header, id);
    }
    if let Some(kind) = &msg.kind {
        short(&mut header, kind);
    }
    assert!(
        header.len() + 8 <= c.frame_max as usize,
        "the content header ({} bytes) does not fit the broker's frame_max {}",
        header.len(),
        c.frame_max
    );
    c.send(2, 1, &header).await;
    let chunk = c.frame_max as usize - 8;
    for part in msg.body.chunks(chunk) {
        c.send(3, 1, part).await;
    }
    loop {
        let (class, method, args) = c.recv().await;
        match (class, method) {
            (60, 80) => break, // basic.ack
            (60, 50) => panic!("raw publish not routed (basic.return)"),
            (60, 120) => panic!("raw publish nacked by the broker"),
            (20, 40) | (10, 50) => {
                let text_len = args[2] as usize;
                panic!(
                    "the broker refused the raw publish: {}",
                    String::from_utf8_lossy(&args[3..3 + text_len])
                );
            }
            _ => {}
        }
    }
    let mut close = Vec::new();
    close.extend_from_slice(&200u16.to_be_bytes());
    short(&mut close, "OK");
    close.extend_from_slice(&[0, 0, 0, 0]);
    c.method(0, 10, 50, &close).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), c.recv()).await;
}
