//! pgmesh replication core. Filled in by the capture and replication work.

pub mod apply;
pub mod capture;
pub mod catalog;
pub mod certs;
pub mod event;
pub mod hlc;
pub mod keepalive;
pub mod linger;
pub mod link;
pub mod log;
pub mod pgoutput;
pub mod pgtls;
pub mod pull;
pub mod replconn;
pub mod resolve;
#[cfg(test)]
mod scratch;
mod script;
