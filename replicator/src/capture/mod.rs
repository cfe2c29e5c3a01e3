//! Capture: the region's committed changes, read from its logical replication slot in
//! commit order, become durable change events.
//!
//! `assemble` turns pgoutput messages into events; `leader` takes the region's
//! leader lock and keeps this node's row in `mesh.node_state`; the capture loop
//! (`run`) owns the replication stream, batching into the change log, and the slot
//! acknowledgement, which only ever confirms positions that are durable in the log.
//! It never writes user tables.

pub mod assemble;
pub mod leader;
pub mod run;

pub use assemble::{AssembleError, Assembled, Assembler, APPLIED_PREFIX};
pub use run::{progress_channel, run, CaptureConfig, CaptureError, Progress, ProgressTx, Role};
