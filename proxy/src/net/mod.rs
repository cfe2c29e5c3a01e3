//! Wire-protocol building blocks: framing, startup packets, the few typed messages
//! the proxy reads or writes, and a stream that is either plain TCP or TLS.
//! Nothing here knows about sessions or policy.

pub mod frame;
pub mod messages;
pub mod startup;
pub mod stream;
