//! Changing the running pool: the control socket's server ([`server`]),
//! the requests it and SIGHUP carry out ([`manage`]: scale, restart,
//! reload, stop), the set of running slots ([`fleet`]) and the
//! replacements that go on in the background ([`rollout`]).

pub mod fleet;
pub mod manage;
pub mod rollout;
pub mod server;
