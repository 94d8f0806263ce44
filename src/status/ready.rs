//! `wait --ready`: is every configured worker of the running supervisor
//! registered? A pure rule over a [`Status`].

use super::Status;
use crate::vocab::{SlotState, SupervisorState};

/// The answer of one look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// Every configured worker runs.
    Yes { workers: i64 },
    /// Not yet: how many run of how many, and what is missing.
    NotYet { running: i64, expected: i64, why: String },
    /// It cannot become ready: these slots were given up.
    Never { given_up: Vec<String> },
}

pub(super) fn judge(s: &Status) -> Ready {
    let not_yet = |why: String| Ready::NotYet {
        running: 0,
        expected: 0,
        why,
    };
    if !s.supervisor.running {
        return not_yet("no supervisor is running".into());
    }
    // The record may still be an earlier run's until this one has cleaned
    // up: it must name the live supervisor.
    let state = match s.supervisor.state {
        Some(state) if s.record_is_current => state,
        _ => return not_yet("the supervisor is starting".into()),
    };
    if matches!(state, SupervisorState::Stopping | SupervisorState::Stopped) {
        return not_yet(format!("the supervisor is {state}"));
    }
    let given_up: Vec<String> = s
        .waiting
        .iter()
        .filter(|w| w.state == SlotState::Failed)
        .map(|w| format!("{}-{}", w.worker_type, w.slot))
        .collect();
    if !given_up.is_empty() {
        return Ready::Never { given_up };
    }
    let (running, expected) = (s.running_slots(), s.supervisor.expected_workers);
    if running == expected && state == SupervisorState::Running {
        return Ready::Yes { workers: running };
    }
    Ready::NotYet {
        running,
        expected,
        why: format!("{running} of {expected} workers registered"),
    }
}
