//! Peer links (DESIGN §5): every node serves its change log to peers and pulls from
//! each peer, over TLS (mutual TLS with the mesh CA in production).
//!
//! A link is a pull: the puller says "events after checkpoint X" ([`protocol::Hello`]),
//! the server streams [`protocol::Batch`]es in log order, at most `window` of them
//! unacknowledged, and the puller acknowledges what it has applied. That one shape
//! gives resume, backpressure and replay after an outage. The server wakes on the
//! change log's NOTIFY ([`crate::log::notify`]), never on a polling timer.
//!
//! - [`protocol`]: message types, framing, the versioned handshake.
//! - [`server`]: the listener and one task per pulling peer ([`session`] inside).
//! - [`client`]: the pulling side of one link.
//! - [`backoff`]: reconnect delays with jitter.
//! - [`tls`]: rustls configurations for both sides.
//!
//! This module moves events; it never resolves conflicts, applies events or stores
//! checkpoints. Those belong to the apply step, which acks only what it committed.

pub mod backoff;
pub mod client;
pub mod protocol;
pub mod server;
mod session;
pub mod tls;

#[cfg(test)]
mod tests;

pub use backoff::Backoff;
pub use client::{ClientConfig, LinkClient, LinkError, LinkEvent};
pub use protocol::{Batch, Hello, Welcome, PROTO_VERSION};
pub use server::{LinkServer, LogReader, ServeConfig, ServeError, SharedTableLog, TailedLog};
