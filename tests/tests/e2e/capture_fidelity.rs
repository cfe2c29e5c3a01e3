//! Response fidelity of stamping: a client sees exactly what it would see
//! without the proxy, and each committed write transaction carries one stamp.
//!
//! Each scenario is a fixed sequence of raw protocol messages (simple queries,
//! extended-protocol pipelines, transactions that commit, chain, fail or roll
//! back, savepoints). It is sent once straight to PostgreSQL and once through a
//! stamping proxy, from a fresh session and a truncated table each time, and
//! the two response sequences must be equal message for message. A
//! `test_decoding` slot then shows, per run, which transactions committed
//! changes and how many `pgmesh` stamps each carried: none directly, exactly
//! one through the proxy, and the same changes either way. This module owns the
//! scenarios and that comparison; the raw client is `wire`'s.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use pgmesh_tests::mesh::{drain_reference, RefTxn, Region};

use crate::wire::{frame, query, Message, RawClient};

/// The reference slot of this module.
const SLOT: &str = "fidelity";

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// Parse of the unnamed statement, no parameter types.
fn parse(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, "");
    cstr(&mut b, sql);
    b.extend_from_slice(&0i16.to_be_bytes());
    frame(b'P', &b)
}

/// Bind of the unnamed portal to the unnamed statement, no parameters.
fn bind() -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, "");
    cstr(&mut b, "");
    for _ in 0..3 {
        b.extend_from_slice(&0i16.to_be_bytes());
    }
    frame(b'B', &b)
}

fn execute() -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, "");
    b.extend_from_slice(&0i32.to_be_bytes());
    frame(b'E', &b)
}

fn describe_portal() -> Vec<u8> {
    frame(b'D', b"P\0")
}

fn sync() -> Vec<u8> {
    frame(b'S', &[])
}

/// Parse, Bind, Execute of one statement (no Sync).
fn ext(sql: &str) -> Vec<Vec<u8>> {
    vec![parse(sql), bind(), execute()]
}

/// A named sequence of client messages and how many write transactions it
/// commits. Each step is sent whole (pipelined) and answered through its last
/// ReadyForQuery before the next step is sent.
struct Scenario {
    name: &'static str,
    steps: Vec<Vec<Vec<u8>>>,
    commits: usize,
}

/// All parts pipelined in one step.
fn scenario(name: &'static str, commits: usize, parts: Vec<Vec<Vec<u8>>>) -> Scenario {
    Scenario {
        name,
        steps: vec![parts.into_iter().flatten().collect()],
        commits,
    }
}

/// Each part its own step, as a client that waits for every answer.
fn stepwise(name: &'static str, commits: usize, parts: Vec<Vec<Vec<u8>>>) -> Scenario {
    Scenario {
        name,
        steps: parts,
        commits,
    }
}

fn q(sql: &str) -> Vec<Vec<u8>> {
    vec![query(sql)]
}

fn s() -> Vec<Vec<u8>> {
    vec![sync()]
}

/// `ext` with a Sync after each message (inside a transaction block, where the
/// unnamed portal survives a Sync).
fn ext_sync_each(sql: &str) -> Vec<Vec<u8>> {
    ext(sql).into_iter().flat_map(|m| [m, sync()]).collect()
}

const INS1: &str = "INSERT INTO fid VALUES (1, 'a')";
const INS2: &str = "INSERT INTO fid VALUES (2, 'b')";
const INS3: &str = "INSERT INTO fid VALUES (3, 'c')";
const DUP1: &str = "INSERT INTO fid VALUES (1, 'dup')";

fn transaction_shapes() -> Vec<Scenario> {
    vec![
        scenario("simple autocommit insert", 1, vec![q(INS1)]),
        scenario(
            "multi-statement BEGIN; INSERT; COMMIT; INSERT",
            2,
            vec![q(&format!("BEGIN; {INS1}; COMMIT; {INS2}"))],
        ),
        scenario(
            "multi-statement implicit transaction that fails",
            0,
            vec![q(&format!("{INS1}; {DUP1}"))],
        ),
        scenario(
            "extended BEGIN/INSERT/COMMIT, one Sync",
            1,
            vec![ext("BEGIN"), ext(INS1), ext("COMMIT"), s()],
        ),
        scenario(
            "extended BEGIN/INSERT/COMMIT, Sync per message",
            1,
            vec![
                vec![parse("BEGIN"), sync(), bind(), execute(), sync()],
                ext_sync_each(INS1),
                ext_sync_each("COMMIT"),
            ],
        ),
        scenario(
            "extended autocommit with Describe",
            1,
            vec![
                vec![
                    parse(&format!("{INS1} RETURNING id, v")),
                    bind(),
                    describe_portal(),
                    execute(),
                ],
                s(),
            ],
        ),
        scenario(
            "extended autocommit inserts, two Syncs",
            2,
            vec![ext(INS1), s(), ext(INS2), s()],
        ),
        scenario(
            "simple COMMIT AND CHAIN",
            2,
            vec![
                q("BEGIN"),
                q(INS1),
                q("COMMIT AND CHAIN"),
                q(INS2),
                q("COMMIT"),
            ],
        ),
        scenario(
            "extended COMMIT AND CHAIN",
            2,
            vec![
                ext("BEGIN"),
                ext(INS1),
                ext("COMMIT AND CHAIN"),
                ext(INS2),
                ext("COMMIT"),
                s(),
            ],
        ),
        stepwise(
            "simple COMMIT of a failed transaction, waiting for each answer",
            0,
            vec![q("BEGIN"), q(INS1), q(DUP1), q("COMMIT")],
        ),
        stepwise(
            "extended COMMIT of a failed transaction, waiting for each answer",
            0,
            vec![
                [ext("BEGIN"), ext(INS1), s()].concat(),
                [ext(DUP1), s()].concat(),
                [ext("COMMIT"), s()].concat(),
            ],
        ),
        scenario(
            "simple ROLLBACK",
            0,
            vec![q("BEGIN"), q(INS1), q("ROLLBACK")],
        ),
        scenario(
            "extended ROLLBACK",
            0,
            vec![ext("BEGIN"), ext(INS1), ext("ROLLBACK"), s()],
        ),
        scenario(
            "savepoints rolled back, failed and released",
            1,
            vec![
                q("BEGIN"),
                q(INS1),
                q("SAVEPOINT a"),
                q(INS2),
                q("ROLLBACK TO SAVEPOINT a"),
                q("SAVEPOINT b"),
                q(DUP1),
                q("ROLLBACK TO SAVEPOINT b"),
                q(INS3),
                q("RELEASE SAVEPOINT a"),
                q("COMMIT"),
            ],
        ),
        scenario(
            "pipeline whose second INSERT fails, then another batch",
            1,
            vec![ext(INS1), ext(DUP1), ext(INS2), s(), ext(INS3), s()],
        ),
        scenario(
            "pipelined block whose INSERT fails before COMMIT",
            0,
            vec![
                ext("BEGIN"),
                ext(INS1),
                ext(DUP1),
                ext(INS2),
                ext("COMMIT"),
                s(),
                q("COMMIT"),
            ],
        ),
        scenario(
            "reads only",
            0,
            vec![
                q("BEGIN"),
                q("SELECT count(*) FROM fid"),
                q("COMMIT"),
                q("SELECT upper('x')"),
                ext("SELECT upper('y')"),
                s(),
                q("COMMIT"),
            ],
        ),
    ]
}

/// Send each step to `addr` in a fresh session, reading every answer through
/// the step's last ReadyForQuery before sending the next.
async fn run(addr: SocketAddr, steps: &[Vec<Vec<u8>>]) -> Result<Vec<Message>> {
    let mut c = RawClient::login(addr).await?;
    let mut out = Vec::new();
    for messages in steps {
        let readies = messages
            .iter()
            .filter(|m| matches!(m[0], b'Q' | b'S'))
            .count();
        c.send(&messages.concat()).await?;
        for _ in 0..readies {
            out.extend(c.until_ready().await?);
        }
    }
    c.send(&frame(b'X', &[])).await?;
    Ok(out)
}

/// Tag and body, with CommandComplete's INSERT oid zeroed.
fn normalized(msgs: &[Message]) -> Vec<(char, String)> {
    msgs.iter()
        .map(|m| {
            let mut body = String::from_utf8_lossy(&m.body).into_owned();
            if m.tag == b'C' && body.starts_with("INSERT ") {
                let rows = body.trim_end_matches('\0').rsplit(' ').next().unwrap_or("");
                body = format!("INSERT 0 {rows}");
            }
            (m.tag as char, body)
        })
        .collect()
}

/// Runs one scenario both ways; returns what went wrong, if anything.
async fn compare(region: &Region, proxy: SocketAddr, sc: &Scenario) -> Result<Vec<String>> {
    let direct_addr: SocketAddr = format!("127.0.0.1:{}", region.cluster.port()).parse()?;
    let mut problems = Vec::new();
    let mut runs: Vec<(Vec<Message>, Vec<RefTxn>)> = Vec::new();
    for addr in [direct_addr, proxy] {
        region.admin.batch_execute("TRUNCATE fid").await?;
        drain_reference(&region.admin, SLOT).await?;
        let answers = run(addr, &sc.steps)
            .await
            .with_context(|| format!("{}: running against {addr}", sc.name))?;
        let txns = drain_reference(&region.admin, SLOT).await?;
        runs.push((answers, txns));
    }
    let (direct, proxied) = (&runs[0], &runs[1]);
    let (a, b) = (normalized(&direct.0), normalized(&proxied.0));
    if a != b {
        problems.push(format!(
            "responses differ\n  direct: {a:?}\n  proxied: {b:?}"
        ));
    }
    if direct.1.len() != sc.commits || direct.1.iter().any(|t| t.stamps != 0) {
        problems.push(format!("direct run committed {:?}", direct.1));
    }
    let changes = |t: &[RefTxn]| t.iter().map(|t| t.changes.clone()).collect::<Vec<_>>();
    if changes(&direct.1) != changes(&proxied.1) {
        problems.push(format!(
            "committed changes differ\n  direct: {:?}\n  proxied: {:?}",
            direct.1, proxied.1
        ));
    }
    let stamps: Vec<usize> = proxied.1.iter().map(|t| t.stamps).collect();
    if stamps.iter().any(|&n| n != 1) || proxied.1.iter().any(|t| t.changes.is_empty()) {
        problems.push(format!(
            "each committed write needs exactly one stamp; got {:?}",
            proxied.1
        ));
    }
    Ok(problems
        .into_iter()
        .map(|p| format!("[{}] {p}", sc.name))
        .collect())
}

async fn fidelity_region(name: &str) -> Result<(Region, pgmesh_tests::ProxyNode)> {
    let region = Region::start(name).await?;
    region
        .admin
        .batch_execute("CREATE TABLE fid (id int PRIMARY KEY, v text)")
        .await?;
    region.create_reference_slot(SLOT).await?;
    let proxy = region.proxy("fid-node").await?;
    Ok((region, proxy))
}

async fn check_all(name: &str, scenarios: Vec<Scenario>) -> Result<()> {
    let (region, proxy) = fidelity_region(name).await?;
    let mut problems = Vec::new();
    for sc in &scenarios {
        problems.extend(compare(&region, proxy.addr(), sc).await?);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

#[tokio::test]
async fn responses_and_stamps_match_direct_for_every_transaction_shape() -> Result<()> {
    check_all("fidelity", transaction_shapes()).await
}

/// A stamp spliced into a multi-statement query must not move the error
/// position PostgreSQL reports for a later statement.
#[tokio::test]
async fn error_positions_after_a_spliced_stamp_match_direct() -> Result<()> {
    let scenarios = vec![
        scenario(
            "error position after a committed block",
            1,
            vec![q(&format!(
                "BEGIN; {INS1}; COMMIT; INSERT INTO no_such_table VALUES (2)"
            ))],
        ),
        scenario(
            "error position after COMMIT AND CHAIN",
            1,
            vec![q(&format!(
                "BEGIN; {INS1}; COMMIT AND CHAIN; SELECT no_such_column FROM fid; COMMIT"
            ))],
        ),
    ];
    check_all("fidpos", scenarios).await
}

/// A client that pipelines its COMMIT behind a statement that fails must get
/// `ROLLBACK`, as without the proxy; a stamp in front of the COMMIT fails in the
/// aborted transaction and takes the COMMIT down with it.
#[tokio::test]
async fn pipelined_commit_of_a_failed_transaction_matches_direct() -> Result<()> {
    let scenarios = vec![
        scenario(
            "simple, pipelined",
            0,
            vec![q("BEGIN"), q(INS1), q(DUP1), q("COMMIT")],
        ),
        scenario(
            "extended, pipelined with a Sync per statement",
            0,
            vec![
                ext("BEGIN"),
                ext(INS1),
                s(),
                ext(DUP1),
                s(),
                ext("COMMIT"),
                s(),
            ],
        ),
        scenario(
            "simple COMMIT AND CHAIN, pipelined",
            0,
            vec![
                q("BEGIN"),
                q(INS1),
                q(DUP1),
                q("COMMIT AND CHAIN"),
                q("ROLLBACK"),
            ],
        ),
    ];
    check_all("fidpipe", scenarios).await
}

/// A COMMIT inside a multi-statement query without BEGIN commits the implicit
/// transaction so far; that transaction wrote and must be stamped too.
#[tokio::test]
async fn commit_inside_an_implicit_transaction_is_stamped() -> Result<()> {
    let scenarios = vec![
        scenario(
            "INSERT; COMMIT; INSERT",
            2,
            vec![q(&format!("{INS1}; COMMIT; {INS2}"))],
        ),
        scenario(
            "INSERT; COMMIT; SELECT",
            1,
            vec![q(&format!("{INS1}; COMMIT; SELECT 1"))],
        ),
    ];
    check_all("fidimplicit", scenarios).await
}
