//! Cross-file tests of the pgoutput codec: fixed round trips of every message type,
//! a hand-assembled walsender byte stream, and property tests over arbitrary bytes
//! and arbitrary messages. Tests here must never need a server or the network;
//! end-to-end capture against a real PostgreSQL belongs to the `tests/` crate.

mod captured;
mod props;
mod roundtrip;
