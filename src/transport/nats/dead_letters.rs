//! Reading, replaying and purging the dead letters of a group in the `{stream}_DLQ`
//! stream. Reading is by sequence (`direct get`/`msg.get` of the next message on the
//! group's subject): it changes nothing. A replay publishes each selected dead letter to
//! its original work-stream subject and deletes it from the dead-letter stream only after
//! the PubAck; its `Nats-Msg-Id` is `replay:{group}:{dead-letter sequence}`, so a replay
//! killed between the PubAck and the delete and run again within the work stream's
//! duplicate window is stored once. The scan stops at the stream's last sequence at the
//! start, so dead letters the replay produces again are not read in the same run. See
//! `docs/dead-letters.md` and decision 0600.

use super::{
    Inner, err, publish,
    wire::{self, MSG_ID},
};
use crate::{
    envelope::Envelope,
    transport::{
        DeadLetter, DeadLetterFilter, DeadLetterReport, DeadLetterVisitor, TransportError,
        TransportErrorKind,
        settle_dead_letters::{self, DeadLetterCursor},
    },
};
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use futures::TryStreamExt;

pub(super) use crate::transport::settle_dead_letters::Action;

async fn dlq_stream(inner: &Inner) -> Result<Stream, TransportError> {
    let s = &inner.settings;
    inner
        .bounded("dead-letter stream", async {
            inner.js.get_stream(&s.dlq_stream).await.map_err(|e| {
                err(
                    TransportErrorKind::Connection,
                    format!("dead-letter stream `{}`", s.dlq_stream),
                    e,
                )
            })
        })
        .await
}

/// The next stored dead letter of `subject` at or after `seq`.
async fn next(
    inner: &Inner,
    st: &Stream,
    subject: &str,
    seq: u64,
) -> Result<Option<(u64, DeadLetter)>, TransportError> {
    let got = inner
        .bounded("read dead letter", async {
            match st
                .raw_message_builder()
                .sequence(seq)
                .next_by_subject(subject.to_owned())
                .send()
                .await
            {
                Ok(m) => Ok(Some(m)),
                Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
                Err(e) => Err(err(TransportErrorKind::Protocol, "reading dead letters", e)),
            }
        })
        .await?;
    Ok(got.map(|m| {
        let (env, _defect) = wire::envelope(Some(&m.headers), None, m.payload.clone());
        (m.sequence, DeadLetter::from_envelope(env))
    }))
}

/// How many dead letters `group` has; an error when the work stream has no consumer of
/// that name and the dead-letter stream nothing for it (a mistyped group).
pub(super) async fn count(inner: &Inner, group: &str) -> Result<u64, TransportError> {
    let st = dlq_stream(inner).await?;
    let subject = inner.settings.dlq_subject(group);
    let n = inner
        .bounded("dead-letter count", async {
            let mut info = st
                .info_with_subjects(&subject)
                .await
                .map_err(|e| err(TransportErrorKind::Protocol, "dead-letter stream info", e))?;
            let mut n = 0u64;
            while let Some((s, c)) = info
                .try_next()
                .await
                .map_err(|e| err(TransportErrorKind::Protocol, "dead-letter stream info", e))?
            {
                if s == subject {
                    n += c as u64;
                }
            }
            Ok(n)
        })
        .await?;
    if n > 0 {
        return Ok(n);
    }
    let s = &inner.settings;
    let consumer = super::topology::consumer_name(group);
    let found = inner
        .bounded("consumer info", async {
            match inner.js.get_stream(&s.stream).await {
                Ok(work) => Ok(work.consumer_info(&consumer).await.is_ok()),
                Err(_) => Ok(false),
            }
        })
        .await?;
    if found {
        Ok(0)
    } else {
        Err(TransportError::new(
            TransportErrorKind::Config,
            format!(
                "stream `{}` has no consumer `{consumer}` and `{}` no dead letter for it: is the group name (and the subject prefix or stream) right?",
                s.stream, s.dlq_stream
            ),
        ))
    }
}

/// Reads the dead letters of `group` oldest first, each to `visit` until it says stop.
pub(super) async fn scan(
    inner: &Inner,
    group: &str,
    visit: &mut DeadLetterVisitor<'_>,
) -> Result<(), TransportError> {
    count(inner, group).await?;
    let st = dlq_stream(inner).await?;
    let subject = inner.settings.dlq_subject(group);
    let mut seq = 1u64;
    while let Some((at, dl)) = next(inner, &st, &subject, seq).await? {
        seq = at + 1;
        if !visit(dl) {
            break;
        }
    }
    Ok(())
}

/// Reads up to `limit` dead letters of `group`, oldest first, without removing them.
pub(super) async fn read(
    inner: &Inner,
    group: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, TransportError> {
    let st = dlq_stream(inner).await?;
    let subject = inner.settings.dlq_subject(group);
    let mut out = Vec::new();
    let mut seq = 1u64;
    while out.len() < limit {
        let Some((at, dl)) = next(inner, &st, &subject, seq).await? else {
            break;
        };
        seq = at + 1;
        out.push(dl);
    }
    Ok(out)
}

/// Replays or purges the dead letters of `group` that `filter` selects (an error once
/// the transport is closed).
pub(super) async fn settle_selected(
    inner: &Inner,
    group: &str,
    filter: &DeadLetterFilter,
    action: Action<'_>,
    progress: &(dyn Fn(&DeadLetter) + Send + Sync),
) -> Result<DeadLetterReport, TransportError> {
    inner.check_open()?;
    let st = dlq_stream(inner).await?;
    let mut cursor = Cursor {
        inner,
        last: st.cached_info().state.last_sequence,
        subject: inner.settings.dlq_subject(group),
        st,
        group,
        seq: 1,
    };
    let (report, stopped) =
        settle_dead_letters::settle_selected(&mut cursor, filter, action, progress).await;
    stopped.map(|()| report)
}

/// A group's dead letters in the dead-letter stream, by sequence up to the last one the
/// stream held at the start.
struct Cursor<'a> {
    inner: &'a Inner,
    st: Stream,
    subject: String,
    group: &'a str,
    seq: u64,
    last: u64,
}

impl DeadLetterCursor for Cursor<'_> {
    /// The dead letter's sequence in the dead-letter stream.
    type Held = u64;

    async fn next(&mut self) -> Result<Option<(u64, DeadLetter)>, TransportError> {
        if self.seq > self.last {
            return Ok(None);
        }
        match next(self.inner, &self.st, &self.subject, self.seq).await? {
            Some((at, dl)) if at <= self.last => {
                self.seq = at + 1;
                Ok(Some((at, dl)))
            }
            _ => Ok(None),
        }
    }

    async fn republish(
        &self,
        items: &[(u64, DeadLetter)],
        copies: &[Envelope],
    ) -> Vec<Result<(), TransportError>> {
        let outgoing = items
            .iter()
            .zip(copies)
            .map(|((seq, dl), env)| {
                let mut headers = wire::wire_headers(env, false);
                headers.insert(MSG_ID, format!("replay:{}:{seq}", self.group).as_str());
                Ok((destination(self.inner, dl), headers, env.payload.clone()))
            })
            .collect();
        publish::publish_many(self.inner, "replay publish", outgoing).await
    }

    /// Deleted from the dead-letter stream. An error leaves it replayed but still listed:
    /// a second replay is absorbed by the work stream's duplicate window and the
    /// consumers' idempotency.
    async fn remove(&mut self, seq: u64, _dl: &DeadLetter) -> Result<(), TransportError> {
        self.inner
            .bounded("delete dead letter", async {
                self.st
                    .delete_message(seq)
                    .await
                    .map(|_| ())
                    .map_err(|e| err(TransportErrorKind::Protocol, "deleting a dead letter", e))
            })
            .await
    }
}

/// The work-stream subject to replay to: where it was consumed from, when that is one of
/// ours, else the subject of its name.
fn destination(inner: &Inner, dl: &DeadLetter) -> String {
    let prefix = format!("{}.", inner.settings.prefix);
    if dl.original_destination.starts_with(&prefix) {
        dl.original_destination.clone()
    } else {
        inner.settings.subject(&dl.envelope.name)
    }
}
