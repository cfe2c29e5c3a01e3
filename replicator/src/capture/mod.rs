//! Capture: the region's committed changes, read from its logical replication slot in
//! commit order, become durable change events.
//!
//! `assemble` turns pgoutput messages into events; the capture loop (this module)
//! owns leadership, the replication stream, batching into the change log, and the
//! slot acknowledgement, which only ever confirms positions that are durable in the
//! log. It never writes user tables.

pub mod assemble;
pub mod run;

pub use assemble::{AssembleError, Assembled, Assembler, APPLIED_PREFIX};
pub use run::{progress_channel, run, CaptureConfig, CaptureError, Progress, ProgressTx, Role};
