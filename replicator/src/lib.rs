//! pgmesh replication core. Filled in by the capture and replication work.

pub mod capture;
pub mod catalog;
pub mod event;
pub mod hlc;
pub mod log;
pub mod pgoutput;
pub mod replconn;
pub mod resolve;
