//! Replaying and purging dead letters, written once for every broker: read the dead
//! letters in order, select those the filter matches, and for each selected one either
//! republish what the rewrite makes of it and remove it only after the broker confirmed
//! the copy (replay), or remove it (purge). A broker supplies the three steps it does
//! differently through [`DeadLetterCursor`]; what was read and not removed stays where
//! it was (RabbitMQ puts unacked messages back, a NATS stream keeps what is not deleted).

use super::{DeadLetter, DeadLetterFilter, DeadLetterReport, DeadLetterRewrite, TransportError};
use crate::envelope::Envelope;

/// How many selected dead letters are republished before their confirms are awaited
/// together.
pub(crate) const BATCH: usize = 64;

/// What to do with the selected dead letters.
#[derive(Clone, Copy)]
pub(crate) enum Action<'a> {
    /// Republish what the rewrite makes of each to the group's work queue or stream, then
    /// remove it.
    Replay(&'a DeadLetterRewrite<'a>),
    /// Remove.
    Purge,
}

/// One broker's dead letters of one group, read once from the front, as the shared loop
/// below replays or purges them.
pub(crate) trait DeadLetterCursor: Send {
    /// What the broker needs to remove a dead letter it handed out, and to republish it
    /// (a delivery tag and the original properties; a stream sequence).
    type Held: Send + Sync;

    /// The next dead letter, or `None` once what the group held at the start was read.
    async fn next(&mut self) -> Result<Option<(Self::Held, DeadLetter)>, TransportError>;

    /// Publishes `copies[i]`, the rewritten `items[i]`, to the group's work queue or
    /// stream and waits for the broker's confirms: one result per item, in order.
    async fn republish(
        &self,
        items: &[(Self::Held, DeadLetter)],
        copies: &[Envelope],
    ) -> Vec<Result<(), TransportError>>;

    /// Removes a dead letter that was purged or whose copy the broker confirmed.
    async fn remove(&mut self, held: Self::Held, dl: &DeadLetter) -> Result<(), TransportError>;
}

/// Replays or purges what `filter` selects of `cursor`'s dead letters. The report counts
/// what was read, selected, done and failed; the error, if any, is the one that stopped
/// the reading (what was done until then is done and counted).
pub(crate) async fn settle_selected<C: DeadLetterCursor>(
    cursor: &mut C,
    filter: &DeadLetterFilter,
    action: Action<'_>,
    progress: &(dyn Fn(&DeadLetter) + Send + Sync),
) -> (DeadLetterReport, Result<(), TransportError>) {
    let mut report = DeadLetterReport::default();
    let mut batch: Vec<(C::Held, DeadLetter)> = Vec::new();
    let stopped = loop {
        if !filter.wants_more(report.selected) {
            break Ok(());
        }
        match cursor.next().await {
            Ok(Some((held, dl))) => {
                report.scanned += 1;
                if !filter.matches(&dl) {
                    continue;
                }
                report.selected += 1;
                batch.push((held, dl));
                if batch.len() >= BATCH {
                    flush(cursor, action, &mut batch, &mut report, progress).await;
                }
            }
            Ok(None) => break Ok(()),
            // What is selected and not yet settled stays where it is.
            Err(e) => break Err(e),
        }
    };
    if stopped.is_ok() {
        flush(cursor, action, &mut batch, &mut report, progress).await;
    }
    (report, stopped)
}

async fn flush<C: DeadLetterCursor>(
    cursor: &mut C,
    action: Action<'_>,
    batch: &mut Vec<(C::Held, DeadLetter)>,
    report: &mut DeadLetterReport,
    progress: &(dyn Fn(&DeadLetter) + Send + Sync),
) {
    let items = std::mem::take(batch);
    let confirmed: Vec<Result<(), TransportError>> = match action {
        Action::Purge => items.iter().map(|_| Ok(())).collect(),
        Action::Replay(rewrite) => {
            let copies: Vec<Envelope> = items.iter().map(|(_, dl)| rewrite(dl)).collect();
            cursor.republish(&items, &copies).await
        }
    };
    for ((held, dl), confirmed) in items.into_iter().zip(confirmed) {
        // Removed only once its copy is confirmed: a failed copy leaves the dead letter.
        let settled = match confirmed {
            Ok(()) => cursor.remove(held, &dl).await,
            Err(e) => Err(e),
        };
        match settled {
            Ok(()) => {
                report.done += 1;
                progress(&dl);
            }
            Err(e) => report.fail(format!("{}: {e}", dl.id())),
        }
    }
}
