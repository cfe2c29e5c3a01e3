//! `pgmesh demo`: a local multi-region mesh on one machine.
//!
//! It creates N PostgreSQL clusters and N nodes in one process (full mesh over
//! loopback), creates a sample schema, makes two regions write the same row at the
//! same time, shows how the conflict was resolved, prints a `psql` connection string
//! per region and stays up until Ctrl-C, then removes everything it created. It is a
//! demo: it uses plain TCP between nodes and trust authentication.

pub mod cluster;

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgmesh_replicator::capture::Role;
use pgmesh_replicator::catalog::{self, TableSelection};
use tokio_postgres::NoTls;

use crate::config::Config;
use crate::node::{self, NodeHandle};
use cluster::Cluster;

/// Region names, in order.
pub const REGIONS: [&str; 9] = [
    "us_east",
    "eu_west",
    "ap_south",
    "sa_east",
    "af_south",
    "me_central",
    "ca_central",
    "eu_north",
    "ap_east",
];

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS accounts (
    id integer PRIMARY KEY,
    owner text NOT NULL,
    balance numeric(12,2) NOT NULL DEFAULT 0,
    note text
)";

/// Ports of region `i`: PostgreSQL, proxy, peer link, metrics.
pub fn ports(base: u16, i: usize) -> [u16; 4] {
    let p = base + 10 * i as u16;
    [p, p + 1, p + 2, p + 3]
}

fn say(msg: impl AsRef<str>) {
    println!("{}", msg.as_ref());
}

/// Everything the demo started, so it can be removed whatever happens.
struct Demo {
    root: PathBuf,
    clusters: Vec<Cluster>,
    nodes: Vec<NodeHandle>,
}

impl Demo {
    async fn teardown(mut self) -> anyhow::Result<()> {
        // Every link first, while every peer still serves: no link sees its peer go.
        for n in &mut self.nodes {
            n.stop_links().await;
        }
        for n in self.nodes {
            n.shutdown(Duration::from_secs(2)).await;
        }
        for c in self.clusters {
            c.remove()?;
        }
        let _ = std::fs::remove_dir_all(&self.root);
        Ok(())
    }
}

/// Ctrl-C, SIGTERM or SIGHUP (its terminal closed): either way the demo removes
/// what it created.
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    let on = |kind: SignalKind| async move {
        match signal(kind) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = on(SignalKind::terminate()) => {}
        _ = on(SignalKind::hangup()) => {}
    }
}

/// Runs the demo until Ctrl-C, SIGTERM or SIGHUP (or until `stop` resolves, for tests).
pub async fn run(
    regions: usize,
    base_port: u16,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if !(2..=REGIONS.len()).contains(&regions) {
        bail!("--regions must be between 2 and {}", REGIONS.len());
    }
    for i in 0..regions {
        for p in ports(base_port, i) {
            TcpListener::bind(("127.0.0.1", p))
                .with_context(|| format!("port {p} is in use; choose another --base-port"))?;
        }
    }
    let root = std::env::temp_dir().join(format!("pgmesh-demo-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let mut demo = Demo {
        root: root.clone(),
        clusters: Vec::new(),
        nodes: Vec::new(),
    };
    let result = tokio::select! {
        r = start_and_show(&mut demo, regions, base_port) => r,
        _ = interrupted() => Ok(false),
    };
    let wait = match &result {
        Ok(true) => {
            say("\nThe mesh is running. Press Ctrl-C to stop it and remove everything.");
            true
        }
        _ => false,
    };
    if wait {
        tokio::select! {
            _ = interrupted() => {}
            _ = stop => {}
        }
    }
    say("stopping nodes and clusters ...");
    demo.teardown().await?;
    say(format!("removed {}", root.display()));
    result.map(|_| ())
}

async fn start_and_show(demo: &mut Demo, n: usize, base: u16) -> anyhow::Result<bool> {
    let names = &REGIONS[..n];
    say(format!("pgmesh demo: {n} regions ({})", names.join(", ")));
    for (i, name) in names.iter().enumerate() {
        let [pg, ..] = ports(base, i);
        let dir = demo.root.join(name);
        let c = tokio::task::spawn_blocking(move || Cluster::start(&dir, pg)).await??;
        say(format!(
            "  [{}/{n}] PostgreSQL for {name} on port {pg}",
            i + 1
        ));
        demo.clusters.push(c);
    }
    for (i, c) in demo.clusters.iter().enumerate() {
        let (client, conn) = tokio_postgres::connect(&c.url(), NoTls).await?;
        tokio::spawn(conn);
        client.batch_execute(SCHEMA).await?;
        catalog::init(&c.url(), names[i], &TableSelection::default()).await?;
    }
    say("  schema `accounts` created and `pgmesh init` done in every region");
    for (i, name) in names.iter().enumerate() {
        let [pg, proxy, peer, metrics] = ports(base, i);
        let peers = names
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, other)| format!("{other}=127.0.0.1:{}", ports(base, j)[2]))
            .collect();
        let cfg = Config {
            listen: Some(format!("127.0.0.1:{proxy}")),
            upstream: Some(format!("postgres://postgres@127.0.0.1:{pg}/postgres")),
            region: name.to_string(),
            node: Some(format!("{name}-node")),
            peer_listen: Some(format!("127.0.0.1:{peer}")),
            metrics_listen: Some(format!("127.0.0.1:{metrics}")),
            peers,
            shutdown_grace_secs: 2,
            ..Config::default()
        };
        demo.nodes.push(node::start(cfg.validate()?).await?);
    }
    wait_leaders(&demo.nodes).await?;
    say("\nConnect to a region with psql:");
    for (i, name) in names.iter().enumerate() {
        let [_, proxy, _, metrics] = ports(base, i);
        say(format!(
            "  {name:<11} psql \"host=127.0.0.1 port={proxy} user=postgres dbname=postgres\"   (metrics: http://127.0.0.1:{metrics}/metrics)"
        ));
    }
    conflict_scenario(names, base).await?;
    Ok(true)
}

async fn wait_leaders(nodes: &[NodeHandle]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in nodes {
        let Some(c) = n.capture() else {
            bail!("a node has no capture")
        };
        let mut role = c.watch_role();
        while *role.borrow_and_update() != Role::Leader {
            tokio::time::timeout_at(deadline.into(), role.changed())
                .await
                .context("timed out waiting for capture leaders")??;
        }
    }
    Ok(())
}

async fn proxy_client(base: u16, i: usize) -> anyhow::Result<tokio_postgres::Client> {
    let conn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres application_name=pgmesh-demo",
        ports(base, i)[1]
    );
    let (client, conn) = tokio_postgres::connect(&conn, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Polls every region until `sql` (one text value) is the same everywhere and
/// satisfies `ok`.
async fn converge(
    clients: &[tokio_postgres::Client],
    sql: &str,
    ok: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut vals = Vec::new();
        for c in clients {
            let v: Option<String> = c.query_opt(sql, &[]).await?.and_then(|r| r.get(0));
            vals.push(v.unwrap_or_default());
        }
        if vals.iter().all(|v| v == &vals[0]) && ok(&vals[0]) {
            return Ok(vals.swap_remove(0));
        }
        if Instant::now() > deadline {
            bail!("regions did not converge: {vals:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn conflict_scenario(names: &[&str], base: u16) -> anyhow::Result<()> {
    let mut clients = Vec::new();
    for i in 0..names.len() {
        clients.push(proxy_client(base, i).await?);
    }
    say(format!("\n1. {} inserts three accounts ...", names[0]));
    clients[0]
        .batch_execute("INSERT INTO accounts (id, owner, balance) VALUES (1, 'ada', 100), (2, 'grace', 250), (3, 'linus', 75) ON CONFLICT DO NOTHING")
        .await?;
    let total = converge(&clients, "SELECT count(*)::text FROM accounts", |v| {
        v == "3"
    })
    .await?;
    say(format!(
        "   ... and every region has them ({total} rows each)."
    ));
    say(format!(
        "2. {} and {} update account 1 at the same moment ...",
        names[0], names[1]
    ));
    let (note_a, note_b) = (
        format!("set in {}", names[0]),
        format!("set in {}", names[1]),
    );
    let (pa, pb): (
        [&(dyn tokio_postgres::types::ToSql + Sync); 1],
        [&(dyn tokio_postgres::types::ToSql + Sync); 1],
    ) = ([&note_a], [&note_b]);
    let (a, b) = tokio::join!(
        clients[0].execute(
            "UPDATE accounts SET balance = 500, note = $1 WHERE id = 1",
            &pa
        ),
        clients[1].execute(
            "UPDATE accounts SET balance = 900, note = $1 WHERE id = 1",
            &pb
        ),
    );
    a?;
    b?;
    let row = converge(
        &clients,
        "SELECT format('balance=%s note=%s', balance, note) FROM accounts WHERE id = 1",
        |_| true,
    )
    .await?;
    say(format!("   every region now has: {row}"));
    for (i, c) in clients.iter().enumerate() {
        for r in c
            .query(
                "SELECT remote_origin, local_origin, winner, strategy,
                        CASE WHEN remote_hlc = local_hlc THEN 'both have the same HLC; the tie goes to the higher origin id'
                             WHEN remote_hlc > local_hlc THEN remote_origin || ' has the later HLC'
                             ELSE local_origin || ' has the later HLC' END
                 FROM mesh.conflicts WHERE tbl = 'public.accounts' ORDER BY id",
                &[],
            )
            .await?
        {
            let (remote, local, winner, strategy, why): (String, String, String, String, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            // `local` is the version the row had here, whichever region wrote it.
            let won = if winner == "remote" { &remote } else { &local };
            say(format!(
                "   conflict seen in {}: incoming {remote} write vs the row's {local} version -> {won}'s wins by {strategy} ({why})",
                names[i]
            ));
        }
    }
    say("   (mesh.conflicts in each region records what it resolved; `SELECT * FROM mesh.conflicts`)");
    Ok(())
}
