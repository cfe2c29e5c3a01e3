//! pgmesh node library: the PostgreSQL wire-protocol proxy and its CLI.
//!
//! The path of a client's bytes is `server` (accept) → `session` (one task per
//! client) → `session::relay` (frame-level decisions) → `session::pump` (socket I/O),
//! with `net` holding the protocol types and `upstream`/`tls` the connections.

pub mod cancel;
pub mod cli;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod net;
pub mod node;
pub mod server;
pub mod session;
pub mod tls;
pub mod upstream;
