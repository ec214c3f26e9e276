//! The frame guard: every byte the broker sends passes through it before lapin parses
//! it, so that no frame a publisher can make takes the process down.
//!
//! lapin parses frames on its own I/O thread, spawned with the platform's default stack
//! (2 MiB) and no way to size it, and its header-table parser recurses once per nesting
//! level: a table nested a few hundred deep overflows that stack and aborts the process
//! (`thread 'lapin-io-loop' has overflowed its stack`) before steadfast sees the message.
//! The guard sits between the socket (after TLS) and lapin, through lapin's own hook for
//! custom transports ([`Connection::connector`]). It scans each content header frame
//! (`basic.deliver`, `basic.get-ok` and `basic.return` properties) without recursion, in
//! one linear pass, and before lapin sees it:
//!
//! - a header whose value nests tables or arrays deeper than [`MAX_HEADER_DEPTH`](crate::envelope::limits::MAX_HEADER_DEPTH) keeps its
//!   bytes but is retyped as a byte array (`x`: the same length prefix, so the frame
//!   keeps its size), which lapin reads flat;
//! - invalid UTF-8 in a header name or a short-string property (which lapin's parser
//!   refuses, closing the connection) is replaced by `?`, byte for byte;
//! - a header table that lapin could not parse at all (unknown type, bad length) becomes
//!   one byte-array header, [`RAW_HEADERS`], holding its bytes;
//!
//! and adds a [`DEFECT`] header that says what it did, which the consumer turns into a
//! dead letter with that reason (see `wire::envelope`). Every other frame passes through
//! untouched, body frames without being buffered. See decision 0106.

use bytes::{Buf, BytesMut};
use futures::io::{AsyncRead, AsyncWrite};
use lapin::{
    Connection, ConnectionProperties,
    tcp::{AMQPUriTcpExt, AsyncTcpStream, OwnedTLSConfig},
    uri::AMQPUri,
};
use std::{
    fmt, io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
};

use crate::envelope::limits::MAX_HEADER_DEPTH as MAX_DEPTH;

/// The header the guard adds to a content header it had to change: what it changed.
pub(super) const DEFECT: &str = "steadfast-header-defect";

/// The header that holds a header table lapin could not parse, as its raw bytes.
pub(super) const RAW_HEADERS: &str = "steadfast-raw-headers";

/// Larger frames are left to lapin, which refuses anything over the negotiated
/// `frame_max` (before the tune, the connection's own frames are small).
const UNTUNED_COLLECT_LIMIT: usize = 1 << 20;

/// The longest header name quoted in a defect.
const NAME_QUOTE: usize = 64;

/// Connects to the broker as lapin would, with the guard between socket and parser.
pub(super) async fn connect(
    uri: AMQPUri,
    props: ConnectionProperties,
) -> lapin::Result<Connection> {
    let tokio = async_rs::Tokio::current();
    let runtime = async_rs::Runtime::new(async_rs::util::RuntimeParts::new(
        tokio.clone(),
        Guarded(tokio.clone()),
    ));
    let plain = async_rs::Runtime::new(tokio);
    Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, _| {
            let tls = OwnedTLSConfig::default();
            let stream = uri.connect_with_config_async(tls.as_ref(), &plain).await?;
            Ok(AsyncTcpStream::Plain(FrameGuard::new(
                stream,
                uri.query.frame_max.unwrap_or(0),
            )))
        },
        props,
    )
    .await
}

type TokioStream = <async_rs::Tokio as async_rs::traits::Reactor>::TcpStream;

/// The tokio reactor, whose TCP streams are guarded: the runtime lapin is given.
#[derive(Clone, Debug)]
pub(super) struct Guarded(async_rs::Tokio);

impl async_rs::traits::Reactor for Guarded {
    type TcpStream = FrameGuard<AsyncTcpStream<TokioStream>>;
    type Sleep = <async_rs::Tokio as async_rs::traits::Reactor>::Sleep;

    /// Not used by lapin, which connects through the `connect` closure.
    fn register<H: io::Read + io::Write + Send + 'static>(
        &self,
        _socket: H,
    ) -> io::Result<impl AsyncRead + AsyncWrite + Send + Unpin + 'static> {
        Err::<async_rs::util::DummyIO, _>(io::Error::other(
            "registering a raw socket is not supported by the guarded runtime",
        ))
    }

    fn sleep(&self, dur: std::time::Duration) -> Self::Sleep {
        self.0.sleep(dur)
    }

    fn interval(
        &self,
        dur: std::time::Duration,
    ) -> impl futures::Stream<Item = std::time::Instant> + Send + 'static {
        self.0.interval(dur)
    }

    fn tcp_connect_addr(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = io::Result<Self::TcpStream>> + Send + 'static {
        let connect = self.0.tcp_connect_addr(addr);
        async move { Ok(FrameGuard::new(AsyncTcpStream::Plain(connect.await?), 0)) }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Nothing read yet: a frame, or the broker's protocol header if it refuses ours.
    Start,
    /// At a frame's first byte.
    Header,
    /// This many bytes of the current frame go through as they are.
    Pass(usize),
    /// The current frame, this long, is read whole and inspected.
    Collect(usize),
    /// Not AMQP frames (the broker refused the protocol): everything passes.
    Raw,
}

/// A stream from the broker whose content header frames are made safe for lapin to parse.
pub(super) struct FrameGuard<S> {
    inner: S,
    state: State,
    /// Read from the broker, not yet handed on.
    pending: BytesMut,
    /// An inspected frame, being handed on.
    ready: BytesMut,
    /// The client's own `frame_max` (0: none), to negotiate as lapin does.
    client_frame_max: u32,
    /// The negotiated `frame_max`, once the broker's `connection.tune` went by (0 before).
    frame_max: usize,
}

impl<S> fmt::Debug for FrameGuard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameGuard")
            .field("state", &self.state)
            .field("frame_max", &self.frame_max)
            .finish_non_exhaustive()
    }
}

impl<S> FrameGuard<S> {
    pub(super) fn new(inner: S, client_frame_max: u32) -> Self {
        Self {
            inner,
            state: State::Start,
            pending: BytesMut::new(),
            ready: BytesMut::new(),
            client_frame_max,
            frame_max: 0,
        }
    }

    /// Moves what `pending` holds along; `true` when it has nothing more to do without
    /// more bytes from the broker or room in the reader's buffer.
    fn advance_state(&mut self) -> bool {
        match self.state {
            State::Start => {
                let Some(&first) = self.pending.first() else {
                    return true;
                };
                self.state = if first == b'A' {
                    State::Raw
                } else {
                    State::Header
                };
                false
            }
            State::Header => {
                if self.pending.len() < 7 {
                    return true;
                }
                let kind = self.pending[0];
                let channel = u16::from_be_bytes([self.pending[1], self.pending[2]]);
                let size = be_u32(&self.pending, 3).unwrap_or(0) as usize;
                let total = size.saturating_add(8);
                let limit = if self.frame_max == 0 {
                    UNTUNED_COLLECT_LIMIT
                } else {
                    self.frame_max
                };
                let inspect = (kind == 2 || (kind == 1 && channel == 0)) && total <= limit;
                self.state = if inspect {
                    State::Collect(total)
                } else {
                    State::Pass(total)
                };
                false
            }
            State::Collect(total) => {
                if self.pending.len() < total {
                    self.pending.reserve(total - self.pending.len());
                    return true;
                }
                let frame = self.pending.split_to(total);
                self.ready = self.inspect(frame);
                self.state = State::Header;
                true
            }
            State::Pass(_) | State::Raw => true,
        }
    }

    /// The frame to hand on for a whole `frame` read from the broker.
    fn inspect(&mut self, frame: BytesMut) -> BytesMut {
        let payload = &frame[7..frame.len() - 1];
        if frame[0] == 1 {
            // connection.tune: class 10, method 30, channel_max u16, frame_max u32.
            if payload.get(..4) == Some(&[0, 10, 0, 30])
                && let Some(server) = be_u32(payload, 6)
            {
                self.frame_max = negotiate(server, self.client_frame_max) as usize;
            }
            return frame;
        }
        match defuse(payload, self.frame_max) {
            None => frame,
            Some((new, defect)) => {
                tracing::warn!(%defect, "a delivery's headers could not be read safely; it will be dead-lettered");
                let mut out = BytesMut::with_capacity(new.len() + 8);
                out.extend_from_slice(&frame[..3]);
                out.extend_from_slice(&u32::try_from(new.len()).unwrap_or(u32::MAX).to_be_bytes());
                out.extend_from_slice(&new);
                out.extend_from_slice(&[0xCE]);
                out
            }
        }
    }
}

/// The `frame_max` lapin settles on: the lower of both sides' non-zero values, at least
/// the protocol's minimum of 4096.
fn negotiate(server: u32, client: u32) -> u32 {
    let chosen = match (server, client) {
        (0, 0) => u32::MAX,
        (0, c) => c,
        (s, 0) => s,
        (s, c) => s.min(c),
    };
    chosen.max(4096)
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            if !this.ready.is_empty() {
                let n = buf.len().min(this.ready.len());
                buf[..n].copy_from_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(n));
            }
            if !this.advance_state() {
                continue;
            }
            if !this.ready.is_empty() {
                continue;
            }
            let pass = match this.state {
                State::Pass(rem) => Some(rem),
                State::Raw => Some(usize::MAX),
                _ => None,
            };
            if let Some(rem) = pass {
                let n = if this.pending.is_empty() {
                    let limit = rem.min(buf.len());
                    match Pin::new(&mut this.inner).poll_read(cx, &mut buf[..limit]) {
                        Poll::Ready(Ok(n)) => n,
                        other => return other,
                    }
                } else {
                    let n = rem.min(buf.len()).min(this.pending.len());
                    buf[..n].copy_from_slice(&this.pending[..n]);
                    this.pending.advance(n);
                    n
                };
                if let State::Pass(rem) = this.state {
                    this.state = if n >= rem {
                        State::Header
                    } else {
                        State::Pass(rem - n)
                    };
                }
                return Poll::Ready(Ok(n));
            }
            let start = this.pending.len();
            this.pending.resize(start + 16 * 1024, 0);
            match Pin::new(&mut this.inner).poll_read(cx, &mut this.pending[start..]) {
                Poll::Ready(Ok(n)) => {
                    this.pending.truncate(start + n);
                    if n == 0 {
                        // The broker closed the connection; a partial frame goes with it.
                        return Poll::Ready(Ok(0));
                    }
                }
                other => {
                    this.pending.truncate(start);
                    return other;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at.checked_add(4)?)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Replaces each byte of every invalid UTF-8 sequence in `bytes` by `?`; whether it did.
fn repair_utf8(bytes: &mut [u8]) -> bool {
    let mut changed = false;
    let mut start = 0;
    while let Err(e) = std::str::from_utf8(&bytes[start..]) {
        let bad = start + e.valid_up_to();
        let len = e.error_len().unwrap_or(bytes.len() - bad);
        bytes[bad..bad + len].fill(b'?');
        changed = true;
        start = bad + len;
    }
    changed
}

/// The size of a fixed-size AMQP field value of type `tag` (lapin's and RabbitMQ's
/// tags); `None` for variable-size and unknown ones.
fn fixed_size(tag: u8) -> Option<usize> {
    Some(match tag {
        b'V' => 0,
        b't' | b'b' | b'B' => 1,
        b's' | b'U' | b'u' => 2,
        b'I' | b'i' | b'f' => 4,
        b'D' => 5,
        b'L' | b'l' | b'd' | b'T' => 8,
        _ => return None,
    })
}

/// Reads the short-string name at `pos` (before `end`), repairing invalid UTF-8 in
/// place: where the name ends, and whether it was repaired.
fn name_at(buf: &mut [u8], pos: usize, end: usize) -> Option<(usize, bool)> {
    let len = usize::from(*buf.get(pos)?);
    let stop = pos + 1 + len;
    if stop > end {
        return None;
    }
    Some((stop, repair_utf8(&mut buf[pos + 1..stop])))
}

/// Scans the field value whose type tag is at `pos`, inside a container ending at
/// `end`, without recursion: where it ends, how deeply its tables and arrays nest, and
/// whether a name inside it had to be repaired. `None` when lapin could not parse it.
fn scan_value(buf: &mut [u8], mut pos: usize, end: usize) -> Option<(usize, usize, bool)> {
    // The ends of the open tables and arrays (and whether each is a table).
    let mut open: Vec<(usize, bool)> = Vec::new();
    let (mut deepest, mut repaired) = (0, false);
    loop {
        let limit = open.last().map_or(end, |o| o.0);
        if pos >= limit {
            return None;
        }
        let tag = buf[pos];
        pos += 1;
        match tag {
            b'F' | b'A' | b'S' | b'x' => {
                let len = be_u32(buf, pos)? as usize;
                pos += 4;
                let stop = pos.checked_add(len).filter(|s| *s <= limit)?;
                if matches!(tag, b'F' | b'A') {
                    open.push((stop, tag == b'F'));
                    deepest = deepest.max(open.len());
                } else {
                    pos = stop;
                }
            }
            other => {
                pos = pos
                    .checked_add(fixed_size(other)?)
                    .filter(|p| *p <= limit)?;
            }
        }
        // Close what ends here; step to the next element of what stays open.
        loop {
            match open.last() {
                None => return Some((pos, deepest, repaired)),
                Some(&(stop, _)) if pos == stop => {
                    open.pop();
                }
                Some(&(stop, is_table)) => {
                    if is_table {
                        let (next, fixed) = name_at(buf, pos, stop)?;
                        pos = next;
                        repaired |= fixed;
                    }
                    break;
                }
            }
        }
    }
}

/// What the guard found wrong in one content header.
#[derive(Default)]
struct Findings {
    /// (name, depth, position of the value's type tag in the table) of each too-deep header.
    deep: Vec<(String, usize, usize)>,
    /// Header names or properties that were not UTF-8.
    not_utf8: Vec<String>,
    /// The table could not be parsed at all.
    malformed: bool,
}

impl Findings {
    fn is_empty(&self) -> bool {
        self.deep.is_empty() && self.not_utf8.is_empty() && !self.malformed
    }

    fn describe(&self, truncated: usize) -> String {
        let mut parts = Vec::new();
        if let Some((name, depth, _)) = self.deep.first() {
            let more = match self.deep.len() {
                1 => String::new(),
                n => format!(" and {} more", n - 1),
            };
            parts.push(format!(
                "header nesting deeper than {MAX_DEPTH}: `{name}` nests {depth} levels{more} (kept as its raw AMQP bytes)"
            ));
        }
        if self.malformed {
            parts.push(format!(
                "the header table is not valid AMQP (kept as its raw bytes in `{RAW_HEADERS}`)"
            ));
        }
        if let Some(first) = self.not_utf8.first() {
            let more = match self.not_utf8.len() {
                1 => String::new(),
                n => format!(" and {} more", n - 1),
            };
            parts.push(format!(
                "not UTF-8, invalid bytes replaced by `?`: {first}{more}"
            ));
        }
        let mut text = parts.join("; ");
        if truncated > 0 {
            text.push_str(&format!(
                " (the raw bytes lost their last {truncated} bytes to fit the frame)"
            ));
        }
        text
    }
}

/// A header name as quoted in a defect: escaped and shortened.
fn quote(name: &[u8]) -> String {
    let s = String::from_utf8_lossy(name).escape_debug().to_string();
    crate::envelope::truncate(&s, NAME_QUOTE).to_owned()
}

const PROPERTY_NAMES: [&str; 16] = [
    "",
    "",
    "cluster_id",
    "app_id",
    "user_id",
    "type",
    "timestamp",
    "message_id",
    "expiration",
    "reply_to",
    "correlation_id",
    "priority",
    "delivery_mode",
    "headers",
    "content_encoding",
    "content_type",
];

/// The content header payload made safe for lapin, and what was done, or `None` when
/// it already is (or is not one the guard understands, which it leaves to lapin).
fn defuse(payload: &[u8], frame_max: usize) -> Option<(Vec<u8>, String)> {
    if payload.len() < 14 || payload[..2] != [0, 60] {
        return None;
    }
    let mut p = payload.to_vec();
    let flags = u16::from_be_bytes([p[12], p[13]]);
    if flags & 1 != 0 {
        return None;
    }
    let mut found = Findings::default();
    let mut pos = 14;
    // Where the header table is (or would go), and its length with its prefix.
    let mut table = (0, 0);
    for bit in (2..=15).rev() {
        if flags & (1 << bit) == 0 {
            if bit == 13 {
                table = (pos, 0);
            }
            continue;
        }
        match bit {
            13 => {
                let len = be_u32(&p, pos)? as usize;
                table = (pos, len.checked_add(4)?);
                pos += table.1;
            }
            12 | 11 => pos += 1,
            6 => pos += 8,
            _ => {
                let len = usize::from(*p.get(pos)?);
                let stop = pos + 1 + len;
                if stop > p.len() {
                    return None;
                }
                if repair_utf8(&mut p[pos + 1..stop]) {
                    found
                        .not_utf8
                        .push(format!("property `{}`", PROPERTY_NAMES[bit]));
                }
                pos = stop;
            }
        }
        if pos > p.len() {
            return None;
        }
    }
    let (at, len) = table;
    let end = at + len;
    if len > 0 {
        let mut i = at + 4;
        while i < end {
            let Some((next, fixed)) = name_at(&mut p, i, end) else {
                found.malformed = true;
                break;
            };
            if fixed {
                found
                    .not_utf8
                    .push(format!("header `{}`", quote(&p[i + 1..next])));
            }
            match scan_value(&mut p, next, end) {
                Some((stop, depth, fixed)) => {
                    if depth > MAX_DEPTH {
                        found
                            .deep
                            .push((quote(&p[i + 1..next]), depth, next - (at + 4)));
                    }
                    if fixed {
                        found
                            .not_utf8
                            .push(format!("a name inside header `{}`", quote(&p[i + 1..next])));
                    }
                    i = stop;
                }
                None => {
                    found.malformed = true;
                    break;
                }
            }
        }
    }
    if found.is_empty() {
        return None;
    }
    let mut body: Vec<u8> = if found.malformed {
        found.deep.clear();
        let mut b = Vec::with_capacity(len + RAW_HEADERS.len() + 6);
        push_short(&mut b, RAW_HEADERS);
        b.push(b'x');
        push_long(&mut b, &payload[at + 4..end]);
        b
    } else if len > 0 {
        let mut b = p[at + 4..end].to_vec();
        for (_, _, tag_at) in &found.deep {
            b[*tag_at] = b'x';
        }
        b
    } else {
        Vec::new()
    };
    // The raw value that gives up its tail if the result would not fit the frame.
    let shrinkable = if found.malformed {
        Some(RAW_HEADERS.len() + 1)
    } else {
        found.deep.first().map(|d| d.2)
    };
    let fixed_len = at + 4 + (p.len() - end) + DEFECT.len() + 6;
    let mut defect = found.describe(0);
    let mut total = fixed_len + body.len() + defect.len();
    let room = if frame_max == 0 {
        usize::MAX
    } else {
        frame_max - 8
    };
    if total > room {
        // The description grows a little to say so; take that too.
        let cut = total - room + 80;
        let value_len = shrinkable
            .and_then(|tag_at| be_u32(&body, tag_at + 1))
            .map_or(0, |l| l as usize);
        match shrinkable {
            Some(tag_at) if cut < value_len => {
                let stop = tag_at + 5 + value_len;
                body.drain(stop - cut..stop);
                body[tag_at + 1..tag_at + 5]
                    .copy_from_slice(&u32::try_from(value_len - cut).ok()?.to_be_bytes());
                defect = found.describe(cut);
                total = fixed_len + body.len() + defect.len();
            }
            _ => {}
        }
        if total > room {
            // No room for the defect header: the changes that keep the frame's size
            // (deep values retyped, names repaired) still make it safe to parse.
            if found.malformed {
                return None;
            }
            for (_, _, tag_at) in &found.deep {
                p[at + 4 + tag_at] = b'x';
            }
            return Some((p, found.describe(0)));
        }
    }
    push_short(&mut body, DEFECT);
    body.push(b'S');
    push_long(&mut body, defect.as_bytes());
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&p[..at]);
    push_long(&mut out, &body);
    out.extend_from_slice(&p[end..]);
    let flags = flags | (1 << 13);
    out[12..14].copy_from_slice(&flags.to_be_bytes());
    Some((out, defect))
}

fn push_short(out: &mut Vec<u8>, s: &str) {
    out.push(u8::try_from(s.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(s.as_bytes());
}

fn push_long(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::AsyncReadExt;
    use lapin::types::AMQPValue;

    fn long(out: &mut Vec<u8>, b: &[u8]) {
        push_long(out, b);
    }

    /// `{"n": {"n": ... "leaf"}}` nested `depth` tables (or arrays) deep, as a value.
    fn nested(depth: usize, arrays: bool) -> Vec<u8> {
        let mut cur = vec![b'S'];
        long(&mut cur, b"leaf");
        for _ in 0..depth {
            let mut next = vec![if arrays { b'A' } else { b'F' }];
            if arrays {
                long(&mut next, &cur);
            } else {
                let mut body = vec![1, b'n'];
                body.extend_from_slice(&cur);
                long(&mut next, &body);
            }
            cur = next;
        }
        cur
    }

    /// A content header payload with `entries` as its header table and a message id.
    fn content_header(entries: &[(&[u8], Vec<u8>)], message_id: &[u8]) -> Vec<u8> {
        let mut p = vec![0, 60, 0, 0];
        p.extend_from_slice(&5u64.to_be_bytes());
        p.extend_from_slice(&((1u16 << 13) | (1 << 7)).to_be_bytes());
        let mut table = Vec::new();
        for (k, v) in entries {
            table.push(u8::try_from(k.len()).unwrap());
            table.extend_from_slice(k);
            table.extend_from_slice(v);
        }
        long(&mut p, &table);
        p.push(u8::try_from(message_id.len()).unwrap());
        p.extend_from_slice(message_id);
        p
    }

    fn text(s: &str) -> Vec<u8> {
        let mut v = vec![b'S'];
        long(&mut v, s.as_bytes());
        v
    }

    /// Parses a content header payload as lapin does.
    fn parse(payload: &[u8]) -> lapin::BasicProperties {
        let (rest, props) =
            lapin::protocol::basic::parse_properties(&payload[12..]).expect("lapin parses it");
        assert!(rest.is_empty());
        props
    }

    fn header<'a>(props: &'a lapin::BasicProperties, name: &str) -> Option<&'a AMQPValue> {
        props.headers().as_ref().unwrap().inner().get(name)
    }

    #[test]
    fn healthy_headers_pass_untouched() {
        let p = content_header(
            &[(b"a", text("x")), (b"deep", nested(MAX_DEPTH, false))],
            b"id-1",
        );
        assert!(defuse(&p, 131_072).is_none());
    }

    #[test]
    fn deep_tables_and_arrays_become_raw_bytes_with_a_defect() {
        for arrays in [false, true] {
            let deep = nested(10_000, arrays);
            let p = content_header(&[(b"a", text("x")), (b"deep", deep.clone())], b"id-1");
            let (out, defect) = defuse(&p, 131_072).expect("defused");
            assert!(
                defect.contains("header nesting deeper than 64: `deep` nests 10000 levels"),
                "{defect}"
            );
            let props = parse(&out);
            assert_eq!(
                header(&props, "deep"),
                Some(&AMQPValue::ByteArray(deep[5..].to_vec().into())),
                "the raw bytes are kept"
            );
            assert_eq!(
                header(&props, "a"),
                Some(&AMQPValue::LongString("x".into()))
            );
            assert_eq!(
                header(&props, DEFECT),
                Some(&AMQPValue::LongString(defect.as_bytes().to_vec().into()))
            );
            assert_eq!(props.message_id().as_ref().unwrap().as_str(), "id-1");
        }
    }

    #[test]
    fn a_header_near_frame_max_gives_up_its_tail() {
        let deep = nested(10_000, false);
        let p = content_header(&[(b"deep", deep)], b"id-1");
        let frame_max = p.len() + 8;
        let (out, defect) = defuse(&p, frame_max).expect("defused");
        assert!(out.len() + 8 <= frame_max, "fits the frame");
        assert!(defect.contains("lost their last"), "{defect}");
        assert!(header(&parse(&out), DEFECT).is_some());
    }

    #[test]
    fn invalid_utf8_names_and_unknown_types_are_made_parseable() {
        let p = content_header(&[(b"bad\xff", text("v"))], b"id\xfe");
        let (out, defect) = defuse(&p, 131_072).expect("defused");
        assert!(defect.contains("property `message_id`"), "{defect}");
        let props = parse(&out);
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), "id?");
        assert!(header(&props, "bad?").is_some());

        let p = content_header(&[(b"a", vec![b'Z', 1, 2])], b"id");
        let (out, defect) = defuse(&p, 131_072).expect("defused");
        assert!(defect.contains("not valid AMQP"), "{defect}");
        let props = parse(&out);
        assert_eq!(
            header(&props, RAW_HEADERS),
            Some(&AMQPValue::ByteArray(vec![1, b'a', b'Z', 1, 2].into()))
        );
    }

    fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&channel.to_be_bytes());
        long(&mut f, payload);
        f.push(0xCE);
        f
    }

    /// A broker's byte stream read through the guard, `chunk` bytes at a time.
    async fn through_guard(stream: Vec<u8>, chunk: usize) -> Vec<u8> {
        let mut g = FrameGuard::new(futures::io::Cursor::new(stream), 0);
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = g.read(&mut buf).await.unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn the_stream_is_rewritten_only_where_needed() {
        let mut tune = vec![0, 10, 0, 30, 0, 0];
        tune.extend_from_slice(&131_072u32.to_be_bytes());
        tune.extend_from_slice(&[0, 60]);
        let deliver = frame(1, 1, &[0, 60, 0, 60, 0]);
        let healthy = frame(2, 1, &content_header(&[(b"a", text("x"))], b"id"));
        let hostile = content_header(&[(b"deep", nested(500, true))], b"id");
        let body = frame(3, 1, &[7u8; 40_000]);
        let mut input = frame(1, 0, &tune);
        for f in [&deliver, &healthy, &body, &deliver] {
            input.extend_from_slice(f);
        }
        input.extend_from_slice(&frame(2, 1, &hostile));
        input.extend_from_slice(&body);
        let (fixed, _) = defuse(&hostile, 131_072).unwrap();
        let mut expected = frame(1, 0, &tune);
        for f in [&deliver, &healthy, &body, &deliver] {
            expected.extend_from_slice(f);
        }
        expected.extend_from_slice(&frame(2, 1, &fixed));
        expected.extend_from_slice(&body);
        for chunk in [1, 7, 4096, 1 << 20] {
            assert_eq!(
                through_guard(input.clone(), chunk).await,
                expected,
                "read {chunk} bytes at a time"
            );
        }
        // A broker that refuses the protocol answers with its own header: passed on.
        assert_eq!(
            through_guard(b"AMQP\x00\x00\x09\x01".to_vec(), 3).await,
            b"AMQP\x00\x00\x09\x01"
        );
    }

    #[test]
    fn frame_max_is_negotiated_as_lapin_does() {
        assert_eq!(negotiate(131_072, 0), 131_072);
        assert_eq!(negotiate(131_072, 8192), 8192);
        assert_eq!(negotiate(0, 0), u32::MAX);
        assert_eq!(negotiate(1000, 0), 4096);
    }
}
