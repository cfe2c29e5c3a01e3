//! pgmesh SQL helpers: a small lexer, statement classification for write stamping,
//! and (later) the versioned migrations of the `mesh` catalog.
//!
//! Classification is lexer-based rather than a full parser: it runs on every query on
//! the proxy's hot path, must accept any PostgreSQL dialect (including syntax a
//! generic parser does not know), and only needs the leading keywords.

pub mod classify;
pub mod lexer;
pub mod migrations;

pub use classify::{classify, classify_all, is_copy_from_stdin, Kind};
