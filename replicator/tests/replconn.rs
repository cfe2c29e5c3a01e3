//! The replication connection client against a real PostgreSQL 15.
//!
//! This test target owns a deliberately minimal throwaway cluster (initdb into a
//! temp dir, a free port, `wal_level=logical`), independent of the `pgmesh-tests`
//! harness so that the replicator crate tests stand alone. It proves the client
//! end to end: login with every supported password method, replication commands
//! and SQL, a pgoutput stream carrying a stamped transaction, and status updates
//! that really move the slot's `confirmed_flush_lsn`. It must never use fixed
//! ports or fixed sleeps: waits poll for a condition under a deadline.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use pgmesh_replicator::pgoutput::{
    Lsn, PgOutputMessage, PgTimestamp, ReplicationMessage, StandbyStatusUpdate, TupleValue,
};
use pgmesh_replicator::replconn::{ConnParams, ReplConnection, ReplError, ReplStream};
use tempfile::TempDir;

/// Roles whose logins go through password checks; everyone else is trusted.
/// These lines sit before initdb's `trust` lines, so they win for these users.
const HBA_PREFIX: &str = "\
host all scram_user 127.0.0.1/32 scram-sha-256
host all md5_user 127.0.0.1/32 md5
host all clear_user 127.0.0.1/32 password
";

/// A throwaway PostgreSQL cluster, stopped and deleted on drop.
struct PgCluster {
    bin: PathBuf,
    dir: TempDir,
    port: u16,
    as_postgres: bool,
}

impl PgCluster {
    fn start() -> PgCluster {
        let bin = find_bin_dir();
        let as_postgres = euid_is_root();
        let dir = tempfile::Builder::new()
            .prefix("pgmesh-replconn-")
            .tempdir()
            .expect("temp dir");
        if as_postgres {
            // PostgreSQL refuses to run as root; hand the whole dir to `postgres`.
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path()));
        }
        let mut cluster = PgCluster {
            bin,
            dir,
            port: 0,
            as_postgres,
        };
        let data = cluster.data_dir();
        run(cluster
            .server_cmd("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data));
        let hba_path = data.join("pg_hba.conf");
        let hba = std::fs::read_to_string(&hba_path).expect("read pg_hba.conf");
        std::fs::write(&hba_path, format!("{HBA_PREFIX}{hba}")).expect("write pg_hba.conf");

        // The port is free when we pick it; another process could take it before
        // the server binds, so retry a few times with a fresh one.
        for attempt in 1..=5 {
            cluster.port = free_port();
            let opts = format!(
                "-c wal_level=logical -c listen_addresses=127.0.0.1 -c port={} \
                 -c unix_socket_directories={} -c fsync=off -c max_wal_senders=10",
                cluster.port,
                cluster.dir.path().display()
            );
            let status = cluster
                .server_cmd("pg_ctl")
                .args(["start", "-w", "-t", "60", "-D"])
                .arg(&data)
                .arg("-l")
                .arg(cluster.dir.path().join("server.log"))
                .arg("-o")
                .arg(opts)
                .status()
                .expect("run pg_ctl start");
            if status.success() {
                return cluster;
            }
            eprintln!("pg_ctl start failed (attempt {attempt}), retrying on another port");
        }
        let log =
            std::fs::read_to_string(cluster.dir.path().join("server.log")).unwrap_or_default();
        panic!("PostgreSQL did not start:\n{log}");
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn server_cmd(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn params(&self, user: &str) -> ConnParams {
        ConnParams::new("127.0.0.1", self.port, user, "postgres")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .server_cmd("pg_ctl")
            .args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(self.data_dir())
            .status();
    }
}

fn find_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PGMESH_PG_BIN") {
        return dir.into();
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/lib/postgresql/15/bin")])
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
        .expect("PostgreSQL 15 binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/15/bin; set PGMESH_PG_BIN")
}

fn euid_is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Retries until `deadline`, for conditions the server reaches asynchronously.
fn before(deadline: tokio::time::Instant, what: &str) {
    assert!(
        tokio::time::Instant::now() < deadline,
        "timed out waiting for {what}"
    );
}

async fn one_value(conn: &mut ReplConnection, sql: &str) -> Option<String> {
    let rows = conn.simple_query(sql).await.unwrap();
    assert_eq!(rows.len(), 1, "{sql}");
    rows[0][0].clone()
}

/// Reads one whole transaction (Begin..Commit) from the stream, answering on a
/// 10 ms timer with status updates for `confirmed` the way capture will, so that
/// `next` is cancelled many times along the way.
async fn read_transaction(stream: &mut ReplStream, confirmed: Lsn) -> Vec<PgOutputMessage> {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut txn = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            m = stream.next() => {
                let m = m.expect("stream error").expect("stream ended early");
                let ReplicationMessage::XLogData(x) = m else { continue };
                let msg = x.message().expect("pgoutput decode");
                let is_commit = matches!(msg, PgOutputMessage::Commit(_));
                if matches!(msg, PgOutputMessage::Begin(_)) || !txn.is_empty() {
                    txn.push(msg);
                }
                if is_commit && !txn.is_empty() {
                    return txn;
                }
            }
            _ = tick.tick() => {
                stream
                    .send_status(StandbyStatusUpdate::confirm(confirmed, PgTimestamp::now()))
                    .await
                    .expect("status update");
            }
            _ = &mut deadline => panic!("no complete transaction within 30 s; got {txn:?}"),
        }
    }
}

const PGOUTPUT_OPTIONS: [(&str, &str); 3] = [
    ("proto_version", "1"),
    ("publication_names", "pgmesh_pub"),
    ("messages", "true"),
];

#[tokio::test]
async fn streams_a_stamped_transaction_and_confirms_it() {
    let pg = PgCluster::start();
    let params = pg.params("postgres");
    let mut conn = ReplConnection::connect(&params).await.unwrap();
    assert!(conn.parameter("server_version").unwrap().starts_with("15"));

    let raw = conn.simple_query("IDENTIFY_SYSTEM").await.unwrap();
    assert_eq!(raw.len(), 1);
    assert_eq!(raw[0].len(), 4, "systemid, timeline, xlogpos, dbname");
    let id = conn.identify_system().await.unwrap();
    assert_eq!(id.timeline, 1);
    assert_eq!(id.dbname.as_deref(), Some("postgres"));
    assert!(id.xlog_pos.is_valid());

    // Plain SQL on a replication=database connection, including error recovery.
    let e = conn.simple_query("SELECT 1/0").await.unwrap_err();
    assert!(
        matches!(&e, ReplError::Server { code, .. } if code == "22012"),
        "{e}"
    );
    conn.simple_query("CREATE TABLE items (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    conn.simple_query("CREATE PUBLICATION pgmesh_pub FOR TABLE items")
        .await
        .unwrap();
    let slot = conn
        .simple_query("CREATE_REPLICATION_SLOT s LOGICAL pgoutput")
        .await
        .unwrap();
    assert_eq!(slot[0][0].as_deref(), Some("s"));
    assert_eq!(slot[0][3].as_deref(), Some("pgoutput"));
    let consistent: Lsn = slot[0][1].as_deref().unwrap().parse().unwrap();

    // A second replication=database connection writes, stamped the way the proxy
    // stamps: the message goes last, inside the same transaction.
    let mut writer = ReplConnection::connect(&params.clone().with_application_name("writer"))
        .await
        .unwrap();
    writer
        .simple_query(
            "BEGIN; INSERT INTO items VALUES (1, 'one'); \
             SELECT pg_logical_emit_message(true, 'pgmesh', 'hello'); COMMIT",
        )
        .await
        .unwrap();

    let mut stream = conn
        .start_logical("s", consistent, &PGOUTPUT_OPTIONS)
        .await
        .unwrap();
    let txn = read_transaction(&mut stream, consistent).await;
    let kinds: Vec<u8> = txn.iter().map(PgOutputMessage::tag).collect();
    assert_eq!(kinds, b"BRIMC", "Begin, Relation, Insert, Message, Commit");
    let PgOutputMessage::Insert(insert) = &txn[2] else {
        unreachable!()
    };
    assert_eq!(
        insert.new.0,
        vec![TupleValue::Text("1".into()), TupleValue::Text("one".into())]
    );
    let PgOutputMessage::Message(stamp) = &txn[3] else {
        unreachable!()
    };
    assert_eq!(stamp.prefix, "pgmesh");
    assert_eq!(&stamp.content[..], b"hello");
    assert!(stamp.is_transactional());
    let PgOutputMessage::Commit(commit) = &txn[4] else {
        unreachable!()
    };
    assert!(commit.end_lsn > consistent);

    // Confirm the commit and watch the slot move.
    stream
        .send_status(StandbyStatusUpdate::confirm(
            commit.end_lsn,
            PgTimestamp::now(),
        ))
        .await
        .unwrap();
    let slot_lsn = "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 's'";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let confirmed = loop {
        let lsn: Lsn = one_value(&mut writer, slot_lsn)
            .await
            .unwrap()
            .parse()
            .unwrap();
        if lsn >= commit.end_lsn {
            break lsn;
        }
        before(deadline, "confirmed_flush_lsn to advance");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(confirmed, commit.end_lsn);

    // Leave copy mode: the same connection runs SQL again and the slot is free.
    let mut conn = stream.stop().await.unwrap();
    let active = "SELECT active FROM pg_replication_slots WHERE slot_name = 's'";
    assert_eq!(one_value(&mut conn, active).await.as_deref(), Some("f"));

    conn.close().await.unwrap();

    // Restarting from the slot's position (0/0) must not redeliver what we
    // confirmed: the next transaction seen is the new one. PostgreSQL's walsender
    // cannot run a second logical START_REPLICATION on one connection, so this
    // is a fresh one, as it will be for capture after any stop.
    writer
        .simple_query("INSERT INTO items VALUES (2, 'two')")
        .await
        .unwrap();
    let mut stream = ReplConnection::connect(&params)
        .await
        .unwrap()
        .start_logical("s", Lsn::INVALID, &PGOUTPUT_OPTIONS)
        .await
        .unwrap();
    let txn = read_transaction(&mut stream, confirmed).await;
    let insert = txn
        .iter()
        .find_map(|m| match m {
            PgOutputMessage::Insert(i) => Some(i),
            _ => None,
        })
        .expect("an insert");
    assert_eq!(insert.new.0[0], TupleValue::Text("2".into()));
    stream.stop().await.unwrap().close().await.unwrap();
    writer.close().await.unwrap();
}

#[tokio::test]
async fn authenticates_with_scram_md5_and_cleartext() {
    let pg = PgCluster::start();
    let mut admin = ReplConnection::connect(&pg.params("postgres"))
        .await
        .unwrap();
    admin
        .simple_query(
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram-secret'; \
             CREATE ROLE clear_user LOGIN REPLICATION PASSWORD 'clear-secret'; \
             SET password_encryption = 'md5'; \
             CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5-secret'",
        )
        .await
        .unwrap();
    let stored = "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid \
                  WHERE rolname = 'scram_user'";
    assert_eq!(one_value(&mut admin, stored).await.as_deref(), Some("t"));

    for (user, password) in [
        ("scram_user", "scram-secret"),
        ("md5_user", "md5-secret"),
        ("clear_user", "clear-secret"),
    ] {
        let params = pg.params(user);
        let mut conn = ReplConnection::connect(&params.clone().with_password(password))
            .await
            .unwrap_or_else(|e| panic!("{user} with the right password: {e}"));
        assert_eq!(
            one_value(&mut conn, "SELECT current_user").await.as_deref(),
            Some(user)
        );
        conn.identify_system().await.unwrap();
        conn.close().await.unwrap();

        let wrong = ReplConnection::connect(&params.clone().with_password("wrong"))
            .await
            .unwrap_err();
        match &wrong {
            ReplError::Server { code, severity, .. } => {
                assert_eq!(code, "28P01", "{user}: {wrong}");
                assert_eq!(severity, "FATAL");
            }
            other => panic!("{user} with a wrong password: {other:?}"),
        }
        assert!(!wrong.is_disconnect());

        let missing = ReplConnection::connect(&params).await.unwrap_err();
        assert!(
            matches!(missing, ReplError::PasswordMissing),
            "{user}: {missing}"
        );
    }
    admin.close().await.unwrap();
}
