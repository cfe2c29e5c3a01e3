//! A network namespace joined to this one by a veth pair: a second "host" whose
//! link can be cut the way a real network partition cuts it.
//!
//! Pulling the cable ([`NetNs::cut`]) drops every packet silently: no RST, no FIN,
//! so each end only learns of the partition through its own timeouts and TCP
//! keepalives. The loopback fault forwarder (`faultnet`) cannot show that, because
//! it keeps its own sockets to the server alive. Creating a namespace needs root
//! (CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip` from iproute2; [`NetNs::create`] says
//! when it cannot, and tests decide whether that skips them ([`required`]). The
//! namespace and its veth pair are removed on drop; what a test process that was
//! killed left behind is removed by the next one that creates a namespace.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

use anyhow::{bail, Context, Result};

/// Environment variable that makes a test fail, not skip, when no namespace can be
/// created (the test script sets it when run as root).
pub const REQUIRE_ENV: &str = "PGMESH_REQUIRE_NETNS";

/// Whether tests must have network namespaces ([`REQUIRE_ENV`] is `1`).
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).as_deref() == Ok("1")
}

/// A network namespace with one veth link to the test's own namespace.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    host_if: String,
    ns_if: String,
    /// This side's address on the link.
    pub host_ip: String,
    /// The namespace's address on the link.
    pub ns_ip: String,
    /// The link's network, for a `pg_hba.conf` line.
    pub subnet: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl NetNs {
    /// Creates a namespace and its link, both up, on a /30 of 10.77.0.0/16 that no
    /// other namespace of this process uses.
    pub fn create() -> Result<NetNs> {
        static CLEAN: Once = Once::new();
        CLEAN.call_once(remove_stale);
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Names carry the whole pid, so two test runs never share one (an interface
        // name has at most 15 characters: "pm" + 7 digits + a letter + 3 digits).
        let net = (pid.wrapping_mul(7).wrapping_add(n)) % 16_000;
        let (a, b) = (net / 64, (net % 64) * 4);
        let name = format!("pgmesh{pid}-{n}");
        ip(&["netns", "add", &name])?;
        // Only now is the namespace ours: from here on, drop removes what was made.
        let ns = NetNs {
            name,
            host_if: format!("pm{pid}h{}", n % 1000),
            ns_if: format!("pm{pid}n{}", n % 1000),
            host_ip: format!("10.77.{a}.{}", b + 1),
            ns_ip: format!("10.77.{a}.{}", b + 2),
            subnet: format!("10.77.{a}.{b}/30"),
        };
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
            "netns",
            &ns.name,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ns.exec_ip(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &ns.ns_if])?;
        ns.exec_ip(&["link", "set", &ns.ns_if, "up"])?;
        ns.exec_ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip` inside the namespace.
    fn exec_ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn wrapper(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name]
            .map(str::to_string)
            .to_vec()
    }

    /// Cuts the link: packets are dropped silently from now on.
    pub fn cut(&self) -> Result<()> {
        self.exec_ip(&["link", "set", &self.ns_if, "down"])
    }

    /// Mends the link.
    pub fn mend(&self) -> Result<()> {
        self.exec_ip(&["link", "set", &self.ns_if, "up"])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it ours.
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// The test process a namespace (`pgmesh<pid>-<n>`) or host-side interface
/// (`pm<pid>h<n>`) was made by, if the name is one of ours.
fn owner(name: &str) -> Option<u32> {
    let (pid, n) = match name.strip_prefix("pgmesh") {
        Some(rest) => rest.split_once('-')?,
        None => name.strip_prefix("pm")?.split_once('h')?,
    };
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Removes the namespaces and host-side interfaces of test processes that are gone
/// (killed before their drop ran). Best effort.
fn remove_stale() {
    let gone =
        |name: &str| owner(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
    let list = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    for line in list(&["-o", "link", "show"]).lines() {
        // "7: pm123h0@if6: <...>"
        let name = line.split(": ").nth(1).unwrap_or("");
        let name = name.split('@').next().unwrap_or("");
        if gone(name) {
            let _ = ip(&["link", "del", name]);
        }
    }
    for line in list(&["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if gone(name) {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::owner;

    #[test]
    fn names_of_ours_give_their_owner() {
        assert_eq!(owner("pgmesh1234567-3"), Some(1_234_567));
        assert_eq!(owner("pm1234567h3"), Some(1_234_567));
        assert_eq!(owner("pm1234567n3"), None, "the namespace side");
        assert_eq!(owner("pgmeshx-1"), None);
        assert_eq!(owner("eth0"), None);
        assert_eq!(owner("pmtu"), None);
    }
}
