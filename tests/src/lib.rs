//! End-to-end harness: real PostgreSQL clusters and the clients that drive them.
//!
//! This crate owns everything a pgmesh end-to-end test needs besides pgmesh
//! itself: [`PgCluster`] starts a real PostgreSQL (`wal_level=logical`, a free
//! loopback port, run as the `postgres` OS user when we are root) and always
//! cleans it up, even when a test panics; [`connect`], [`psql`] and [`pgbench`]
//! drive servers the way real clients do; [`wait_until`] and [`wait_for`] are how
//! tests wait, with a deadline. It must never use fixed ports or fixed sleeps,
//! and never leave a server or directory behind (see DESIGN.md §8).
//!
//! ```no_run
//! use pgmesh_tests::{ClusterOptions, PgCluster};
//!
//! // In a #[tokio::test]:
//! async fn example() -> anyhow::Result<()> {
//!     let (a, b) = tokio::try_join!(
//!         PgCluster::start_async(ClusterOptions::default()),
//!         PgCluster::start_async(ClusterOptions::default()),
//!     )?;
//!     let client = a.connect().await?;
//!     client.simple_query("SELECT 1").await?;
//!     b.kill9()?;
//!     b.start_again()?;
//!     Ok(())
//! }
//! ```

pub mod client;
pub mod cluster;
pub mod faultnet;
pub mod mesh;
pub mod netns;
pub mod node;
pub mod ports;
pub mod regions;
pub mod wait;

pub use client::{connect, pgbench, psql, CmdOutput};
pub use cluster::{AuthMethod, ClusterOptions, PasswordUser, PgBin, PgCluster};
pub use node::{pgmesh_bin, pgmesh_output, PgmeshProcess, ProxyNode};
pub use wait::{wait_for, wait_row, wait_until, wait_until_blocking, DEFAULT_TIMEOUT};

/// Install a `tracing` subscriber that writes through the test harness's
/// captured output, filtered by `RUST_LOG` (default `info`). Safe to call from
/// every test; only the first call does anything.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}
