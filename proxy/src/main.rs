//! The `pgmesh` binary: parses the command line, sets up logging and the runtime,
//! and hands over to `pgmesh_proxy::cli`.

use clap::Parser;
use pgmesh_proxy::cli::{self, Cli, Command, LogCommand};
use tracing_subscriber::EnvFilter;

/// mimalloc rather than the system allocator: the replication tasks allocate and free
/// many small buffers per event, and glibc's malloc was a fifth of their CPU time.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.command {
        Command::Demo { .. } => "warn",
        _ => "info",
    };
    let log = cli.log.as_deref().unwrap_or(default_log);
    let filter = EnvFilter::try_new(log).unwrap_or_else(|e| {
        eprintln!("pgmesh: invalid log filter {log:?} ({e}); using {default_log:?}");
        EnvFilter::new(default_log)
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = || {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Ok(v) = std::env::var("PGMESH_WORKER_THREADS") {
            match v.trim().parse::<usize>() {
                Ok(n) if n > 0 => {
                    b.worker_threads(n);
                }
                _ => anyhow::bail!(
                    "PGMESH_WORKER_THREADS must be a number of threads, 1 or more, got {v:?}"
                ),
            }
        }
        b.enable_all().build().map_err(anyhow::Error::from)
    };
    let result = match cli.command {
        Command::CheckConfig { file } => cli::check_config(&file),
        Command::Run(args) => runtime().and_then(|rt| rt.block_on(cli::run(*args))),
        Command::Init(args) => runtime().and_then(|rt| rt.block_on(cli::init(args))),
        Command::Log(LogCommand::Tail {
            upstream,
            last,
            no_follow,
        }) => runtime().and_then(|rt| rt.block_on(cli::log::tail(&upstream, last, !no_follow))),
        Command::Demo { regions, base_port } => runtime().and_then(|rt| {
            rt.block_on(pgmesh_proxy::demo::run(
                regions,
                base_port,
                std::future::pending(),
            ))
        }),
        Command::Certs { out, nodes, hosts } => cli::certs(&out, &nodes, &hosts),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgmesh: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
