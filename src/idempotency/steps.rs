//! The steps of every SQL inbox, named once for their timeouts and errors.

use crate::sql::Step;

pub(crate) const MARK: Step = Step {
    doing: "inbox mark",
    failed: "could not mark the inbox key",
};
pub(crate) const CLEANUP: Step = Step {
    doing: "inbox cleanup",
    failed: "could not clean up the inbox",
};
pub(crate) const TAKE: Step = Step {
    doing: "idempotency begin",
    failed: "could not take the idempotency key",
};
pub(crate) const STATE: Step = Step {
    doing: "idempotency begin",
    failed: "could not read the idempotency key",
};
pub(crate) const REMAINING: Step = Step {
    doing: "idempotency lease",
    failed: "could not read the idempotency lease",
};
pub(crate) const COMPLETE: Step = Step {
    doing: "idempotency complete",
    failed: "could not complete the idempotency key",
};
pub(crate) const RELEASE: Step = Step {
    doing: "idempotency release",
    failed: "could not release the idempotency key",
};
pub(crate) const LOOK: Step = Step {
    doing: "inbox lookup",
    failed: "could not look up the inbox key",
};
pub(crate) const FINGERPRINT: Step = Step {
    doing: "reading a payload fingerprint",
    failed: "could not read the payload fingerprint",
};
