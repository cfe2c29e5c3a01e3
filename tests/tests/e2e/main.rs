//! The one end-to-end test binary: real PostgreSQL, real clients, pgmesh between.
//!
//! Every area is a module here so CI compiles and links one binary. Each test
//! starts its own cluster (and proxy) and cleans up through `Drop`, so tests run
//! in parallel and in any order. Tests wait on conditions with deadlines and
//! never sleep hoping for something. The proxy-process tests need the `pgmesh`
//! binary: run `cargo build -p pgmesh-proxy` before `cargo test -p pgmesh-tests
//! --test e2e` (see `pgmesh_tests::pgmesh_bin`).

mod apply_absent;
mod apply_held;
mod apply_race;
mod apply_stress;
mod apply_truncate;
mod capture_backlog;
mod capture_cli;
mod capture_crash;
mod capture_exactly_once;
mod capture_fidelity;
mod capture_nopk;
mod capture_partition;
mod capture_stamps;
mod capture_values;
mod catalog_locks;
mod harness;
mod log_reads;
mod mesh_chaos;
mod mesh_convergence;
mod mesh_crash;
mod mesh_dead_letters;
mod mesh_demo;
mod mesh_failover;
mod mesh_linger;
mod mesh_link_faults;
mod mesh_metrics;
mod mesh_outage;
mod mesh_pg_tls;
mod mesh_prune;
mod mesh_races;
mod mesh_replay;
mod mesh_tls;
mod mesh_tombstones;
mod mesh_topology;
mod mesh_values;
mod proxy_auth;
mod proxy_clients;
mod proxy_copy;
mod proxy_faults;
mod proxy_lifecycle;
mod proxy_streams;
mod proxy_tls;
mod proxy_tools;
mod support;
mod wire;
