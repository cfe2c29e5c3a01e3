//! Loopback ports for servers whose port must be known before they start.
//!
//! A port found by binding `127.0.0.1:0` is an *ephemeral* port: the kernel hands
//! the same range to every later `:0` listener and to the source side of every
//! outgoing connection. Between probing such a port and the server binding it,
//! one of the many connections a test makes can take it (CI saw a node's proxy,
//! listening on `:0`, get the port reserved a moment earlier for the next node's
//! peer listener). So ports are drawn from below the ephemeral range, where the
//! kernel never assigns on its own, and each is handed out once per process.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

use anyhow::{bail, Result};

/// Lowest port handed out.
const LOW: u16 = 10_000;
/// Fallback ephemeral range start when `/proc` cannot say (Linux's default).
const DEFAULT_EPHEMERAL_LOW: u16 = 32_768;

/// A port on 127.0.0.1 that was free a moment ago, outside the kernel's ephemeral
/// range, and not handed out before by this process.
pub fn free_port() -> Result<u16> {
    static STATE: Mutex<Option<(HashSet<u16>, u64)>> = Mutex::new(None);
    let high = ephemeral_low().max(LOW + 1_000);
    let span = u64::from(high - LOW);
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let (given, next) = state.get_or_insert_with(|| (HashSet::new(), seed()));
    for _ in 0..span {
        // A stride coprime with the span walks every port once, and processes
        // with different seeds start far apart.
        *next = (*next + 7_919) % span;
        let port = LOW + *next as u16;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return Ok(port);
        }
    }
    bail!("no free port between {LOW} and {high}")
}

/// Where the kernel's ephemeral (automatically assigned) ports begin.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_LOW)
}

/// A per-process starting point, so test binaries run side by side rarely probe
/// the same ports.
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u64::from(std::process::id()).wrapping_mul(2_654_435_761) ^ u64::from(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_fresh_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
        assert!(ports
            .iter()
            .all(|&p| p >= LOW && p < ephemeral_low().max(LOW + 1_000)));
    }
}
