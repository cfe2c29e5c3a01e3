//! An async client for PostgreSQL's logical replication connection, written
//! against the wire protocol.
//!
//! tokio-postgres cannot drive `START_REPLICATION` (it has no CopyBoth mode), so
//! capture talks to the walsender through this module. It owns the whole life of
//! a `replication=database` session: connecting and authenticating (trust,
//! cleartext, MD5, SCRAM-SHA-256), running replication commands and plain SQL
//! with [`ReplConnection::simple_query`], starting logical decoding with
//! [`ReplConnection::start_logical`], and streaming with [`ReplStream`]:
//! CopyData frames in, decoded by [`crate::pgoutput`], standby status updates out.
//!
//! TLS follows the URL's `sslmode` and `sslrootcert` as in libpq ([`crate::pgtls`]);
//! SCRAM runs without channel binding.
//!
//! It must never decide what to acknowledge or when (the capture loop owns the
//! status-update schedule and confirms only what is durable in the change log),
//! never interpret row data, and never log passwords or row contents.
//!
//! Files follow the data path: `params` (where to connect) → `auth` (login) →
//! `connection` (command mode) → `stream` (copy mode); beneath them, `transport`
//! (the socket and its buffers), [`frame`] (framing), [`backend`] /
//! [`frontend`] (message types), and [`command`] (command text).

mod auth;
pub mod backend;
pub mod command;
mod connection;
mod error;
pub mod frame;
pub mod frontend;
mod params;
mod stream;
mod transport;

#[cfg(test)]
mod tests;

pub use auth::BackendKey;
pub use command::{quote_identifier, quote_literal, IdentifySystem};
pub use connection::ReplConnection;
pub use error::ReplError;
pub use params::{ConnParams, DEFAULT_APPLICATION_NAME, DEFAULT_PORT};
pub use stream::ReplStream;
