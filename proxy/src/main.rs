//! The `pgmesh` binary.
fn main() {}
