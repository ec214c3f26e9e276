//! The steps of every SQL outbox, named once for their timeouts and errors.

use crate::sql::Step;

pub(crate) const ENQUEUE: Step = Step {
    doing: "outbox enqueue",
    failed: "could not write the outbox row",
};
pub(crate) const PARKED: Step = Step {
    doing: "listing parked rows",
    failed: "could not list parked outbox rows",
};
pub(crate) const REQUEUE: Step = Step {
    doing: "requeueing a row",
    failed: "could not requeue the outbox row",
};
pub(crate) const DELETE_PARKED: Step = Step {
    doing: "deleting a parked row",
    failed: "could not delete the parked outbox row",
};
pub(crate) const STATUS: Step = Step {
    doing: "reading the outbox status",
    failed: "could not read the outbox status",
};
pub(crate) const PENDING: Step = Step {
    doing: "counting pending rows",
    failed: "could not count pending outbox rows",
};
pub(crate) const CLAIM: Step = Step {
    doing: "claiming outbox rows",
    failed: "could not claim outbox rows",
};
pub(crate) const SENT: Step = Step {
    doing: "marking rows sent",
    failed: "could not mark outbox rows sent",
};
pub(crate) const DELETE_SENT: Step = Step {
    doing: "deleting sent rows",
    failed: "could not delete sent outbox rows",
};
pub(crate) const FAILED: Step = Step {
    doing: "recording failures",
    failed: "could not record an outbox failure",
};
pub(crate) const PURGE: Step = Step {
    doing: "purging sent rows",
    failed: "could not purge sent outbox rows",
};
pub(crate) const BACKLOG: Step = Step {
    doing: "measuring the backlog",
    failed: "could not measure the outbox backlog",
};
