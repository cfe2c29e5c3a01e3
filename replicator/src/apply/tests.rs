//! Apply against a real database: what [`Applier::durable_checkpoint`] promises.

use super::*;
use crate::event::Op;
use crate::scratch;

/// The checkpoint it returns is flushed: the WAL is on disk past a batch that
/// committed asynchronously just before (pruning at peers relies on it).
#[tokio::test]
async fn a_durable_checkpoint_is_flushed_with_the_batches_before_it() {
    let Some(url) = scratch::database("pgmesh_durable_cp").await else {
        return;
    };
    let a = Applier::connect(&url, "r1", "r2", &["r2".into()], None)
        .await
        .unwrap();
    let c = a.client();
    // A batch's checkpoint, committed as apply commits (asynchronously).
    c.execute(
        "UPDATE mesh.link_state SET checkpoint = 42 WHERE peer = 'r2'",
        &[],
    )
    .await
    .unwrap();
    let lsn =
        |sql: &'static str| async move { c.query_one(sql, &[]).await.unwrap().get::<_, String>(0) };
    let committed = lsn("SELECT pg_current_wal_insert_lsn()::text").await;
    assert_eq!(a.durable_checkpoint("r2").await.unwrap(), 42);
    let behind: bool = c
        .query_one(
            "SELECT pg_current_wal_flush_lsn() < $1::text::pg_lsn",
            &[&committed],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !behind,
        "the WAL is not flushed past the batch ({committed})"
    );
    let kept: i64 = c
        .query_one(
            "SELECT durable_checkpoint FROM mesh.link_state WHERE peer = 'r2'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 42);
    drop(a);
    scratch::drop_database(&url).await;
}

/// Custom plans `c` made for 8 reads of versions through one prepared statement.
async fn custom_plans_of_version_reads(c: &Client) -> i64 {
    let keys = vec![("public.t".to_string(), r#"[["id", "1"]]"#.to_string())];
    let load = c.prepare(versions::LOAD).await.unwrap();
    for _ in 0..8 {
        versions::load(c, &load, &keys).await.unwrap();
    }
    c.query_one(
        "SELECT coalesce(sum(custom_plans), 0)::int8 FROM pg_prepared_statements",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The session plans a batch statement once. A statement over array parameters,
/// like the versions' read, otherwise gets a custom plan, so is planned again, at
/// every execution (PostgreSQL's choice for them, shown here on a plain session).
#[tokio::test]
async fn batch_statements_are_planned_once() {
    let Some(url) = scratch::database("pgmesh_generic_plans").await else {
        return;
    };
    let plain = catalog::connect(&url).await.unwrap();
    assert!(
        custom_plans_of_version_reads(&plain).await >= 8,
        "premise: PostgreSQL plans this statement at every execution by default"
    );
    // Its own peer: replication origins are the cluster's, and tests run at once.
    let a = Applier::connect(&url, "r1", "r9", &["r9".into()], None)
        .await
        .unwrap();
    assert_eq!(custom_plans_of_version_reads(a.client()).await, 0);
    drop((a, plain));
    scratch::drop_database(&url).await;
}

/// Table `t (id int PRIMARY KEY, v text)` and a dead letter from `peer`, marked for
/// retry, of an event inserting row 1 into it; returns the event and the letter's id.
async fn retry_letter(admin: &Client, peer: &str) -> (ChangeEvent, i64) {
    admin
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let row = vec![
        ("id".to_string(), Some("1".to_string())),
        ("v".to_string(), Some("x".to_string())),
    ];
    let mut event = scratch::event(peer, 1, false);
    event.changes = vec![crate::event::Change {
        table: "public.t".into(),
        op: Op::Insert,
        pk: vec![row[0].clone()],
        old: None,
        new: Some(row),
        unchanged: Vec::new(),
        types: vec![23, 25],
        prev: None,
    }];
    let id: i64 = admin
        .query_one(
            "INSERT INTO mesh.dead_letters (peer, origin, hlc, event, error, status)
             VALUES ($1, $1, $2, $3::text::jsonb, 'a constraint here', 'retry') RETURNING id",
            &[
                &peer,
                &(event.hlc.as_u64() as i64),
                &serde_json::to_string(&event).unwrap(),
            ],
        )
        .await
        .unwrap()
        .get(0);
    (event, id)
}

/// A retried dead letter tells capture the HLC it applied, as a batch does: in a
/// transactional logical message and in the link's `applied_hlc`. A local write after
/// it then gets a higher HLC than the change it overwrites.
#[tokio::test]
async fn a_retried_dead_letter_tells_capture_its_hlc() {
    let Some(url) = scratch::database("pgmesh_retry_hlc").await else {
        return;
    };
    let mut a = Applier::connect(&url, "r1", "r4", &["r4".into()], None)
        .await
        .unwrap();
    let admin = catalog::connect(&url).await.unwrap();
    let (event, id) = retry_letter(&admin, "r4").await;
    let slot = format!("pgmesh_retry_hlc_{}", std::process::id());
    admin
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
            &[&slot],
        )
        .await
        .unwrap();
    assert_eq!(a.retry_dead_letters().await.unwrap(), 1);
    // Apply commits asynchronously, and a slot decodes flushed WAL only: a synchronous
    // commit that wrote WAL flushes the retry's.
    admin
        .batch_execute("CREATE TABLE flushed ()")
        .await
        .unwrap();
    let messages: Vec<String> = admin
        .query(
            "SELECT data FROM pg_logical_slot_peek_changes($1, NULL, NULL) WHERE data LIKE 'message:%'",
            &[&slot],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
    let hlc = event.hlc.as_u64() as i64;
    let content = format!(
        "prefix: {APPLIED_PREFIX}, sz: {} content:{hlc}",
        hlc.to_string().len()
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("transactional: 1") && m.contains(&content)),
        "no applied-HLC message {content:?} in {messages:?}"
    );
    let row = admin
        .query_one(
            "SELECT (SELECT status FROM mesh.dead_letters WHERE id = $1),
                    (SELECT applied_hlc FROM mesh.link_state WHERE peer = 'r4'),
                    (SELECT count(*) FROM t)",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "applied");
    assert_eq!(row.get::<_, i64>(1), hlc);
    assert_eq!(row.get::<_, i64>(2), 1);
    drop(admin);
    scratch::drop_database(&url).await;
}

/// A dead letter skipped while its retry is under way stays skipped: the retry locks
/// the letter and applies it only if it is still marked for retry. (Each test here
/// pulls from a peer of its own: replication origins are cluster-wide.)
#[tokio::test]
async fn a_skip_that_commits_during_a_retry_wins() {
    let Some(url) = scratch::database("pgmesh_skip_race").await else {
        return;
    };
    let mut a = Applier::connect(&url, "r1", "r7", &["r7".into()], None)
        .await
        .unwrap();
    let admin = catalog::connect(&url).await.unwrap();
    let (_, id) = retry_letter(&admin, "r7").await;
    // The skip is made, not yet committed, when the retry reads its list.
    let skipper = catalog::connect(&url).await.unwrap();
    skipper
        .batch_execute(&format!("BEGIN; SELECT mesh.skip_dead_letter({id})"))
        .await
        .unwrap();
    let pid: i32 = a
        .client()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let retry = tokio::spawn(async move { a.retry_dead_letters().await });
    scratch::until_waiting_on_lock(&admin, pid).await;
    skipper.batch_execute("COMMIT").await.unwrap();
    assert_eq!(retry.await.unwrap().unwrap(), 0, "nothing retried");
    let status: String = admin
        .query_one("SELECT status FROM mesh.dead_letters WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "skipped");
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "the skipped event was applied");
    drop((admin, skipper));
    scratch::drop_database(&url).await;
}

/// The admin views read the clock: a link whose peer's clock runs ahead shows no
/// negative lag, and a node whose heartbeat ages past 10 s inside a reading
/// transaction is no longer alive there.
#[tokio::test]
async fn admin_views_read_the_clock() {
    let Some(url) = scratch::database("pgmesh_view_clocks").await else {
        return;
    };
    let a = Applier::connect(&url, "r1", "r8", &["r8".into()], None)
        .await
        .unwrap();
    let c = a.client();
    c.execute(
        "UPDATE mesh.link_state SET checkpoint = 5, peer_head = 10,
                last_commit_ts = clock_timestamp() + interval '1 hour' WHERE peer = 'r8'",
        &[],
    )
    .await
    .unwrap();
    let lag: i64 = c
        .query_one("SELECT lag_ms FROM mesh.links WHERE name = 'r8'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(lag, 0);
    // A deliberate gap inside one transaction: now() stays, the clock moves on.
    let rows = c
        .simple_query(
            "BEGIN;
             INSERT INTO mesh.node_state (node, region, role, heartbeat)
             VALUES ('n1', 'r1', 'leader', clock_timestamp() - interval '9900 milliseconds');
             SELECT pg_sleep(0.3);
             SELECT alive::text FROM mesh.nodes WHERE node = 'n1';
             COMMIT",
        )
        .await
        .unwrap();
    let alive: Vec<_> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .filter(|v| v == "true" || v == "false")
        .collect();
    assert_eq!(alive, ["false"]);
    drop(a);
    scratch::drop_database(&url).await;
}

/// Two links racing on a key with no row: one inserts it, the other deletes it with a
/// newer HLC, and each read "no row" before the other wrote. The key locks make the
/// second wait for the first; without them the insert stayed under the delete's
/// tombstone (a row no other region has, once the tombstone is pruned).
/// A change of row 1 of `public.t (id int, v text)` (a TRUNCATE of the table when
/// `op` is one).
fn change(op: Op, new: Option<&str>) -> crate::event::Change {
    let pk = if op == Op::Truncate {
        Vec::new()
    } else {
        vec![("id".to_string(), Some("1".to_string()))]
    };
    crate::event::Change {
        table: "public.t".into(),
        op,
        pk,
        old: None,
        new: new.map(|v| {
            vec![
                ("id".to_string(), Some("1".to_string())),
                ("v".to_string(), Some(v.to_string())),
            ]
        }),
        unchanged: Vec::new(),
        types: vec![23, 25],
        prev: None,
    }
}

/// A session on `url`, where it created `public.t (id int PRIMARY KEY, v text)`.
async fn table_t(url: &str) -> Client {
    let admin = catalog::connect(url).await.unwrap();
    admin
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    admin
}

/// Event `n` of `origin`, at `seq` in its log, with one change.
fn logged(origin: &str, n: u64, seq: i64, c: crate::event::Change) -> Logged {
    let mut event = scratch::event(origin, n, false);
    event.changes = vec![c];
    Logged { seq, event }
}

/// The batch's TRUNCATE rewrites the stored version of a row the batch changed
/// before it: the check of the versions the batch resolved against expects that.
#[tokio::test]
async fn a_batch_that_changes_a_row_then_truncates_its_table_applies() {
    let Some(url) = scratch::database("pgmesh_change_then_truncate").await else {
        return;
    };
    let admin = table_t(&url).await;
    let mut a = Applier::connect(&url, "r1", "r10", &["r10".into()], None)
        .await
        .unwrap();
    let first = logged("r10", 1, 1, change(Op::Insert, Some("x")));
    a.apply_batch("r10", &[first], 1, 1).await.unwrap();
    let batch = [
        logged("r10", 2, 2, change(Op::Update, Some("y"))),
        logged("r10", 3, 3, change(Op::Truncate, None)),
    ];
    let out = a.apply_batch("r10", &batch, 3, 3).await.unwrap();
    assert_eq!(out.applied, 2);
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    let (hlc, deleted): (i64, bool) = {
        let r = admin
            .query_one(
                "SELECT hlc, deleted FROM mesh.row_versions WHERE tbl = 'public.t' AND pk = '[[\"id\", \"1\"]]'",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    let truncate = scratch::event("r10", 3, false).hlc.as_u64() as i64;
    assert_eq!((rows, hlc, deleted), (0, truncate, true));
    drop(a);
    drop(admin);
    scratch::drop_database(&url).await;
}

#[tokio::test]
async fn two_links_on_an_absent_key_decide_one_after_the_other() {
    let Some(url) = scratch::database("pgmesh_absent_key").await else {
        return;
    };
    let admin = table_t(&url).await;
    let insert = logged("r5", 1, 1, change(Op::Insert, Some("x")));
    let delete = logged("r6", 2, 1, change(Op::Delete, None));
    // Connecting takes the change log's append lock once, so both connect first.
    let mut appliers = Vec::new();
    for (peer, batch) in [("r6", delete), ("r5", insert)] {
        let a = Applier::connect(&url, "r1", peer, &[peer.into()], None)
            .await
            .unwrap();
        appliers.push((peer, batch, a));
    }
    // Both batches stop at the append lock, held here, once decided.
    admin
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&crate::log::table::APPEND_LOCK],
        )
        .await
        .unwrap();
    let mut spawned = Vec::new();
    for (peer, batch, mut a) in appliers {
        let pid: i32 = a
            .client()
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        spawned.push(tokio::spawn(async move {
            a.apply_batch(peer, &[batch], 1, 1).await.map(|_| ())
        }));
        scratch::until_waiting_on_lock(&admin, pid).await;
    }
    admin
        .execute(
            "SELECT pg_advisory_unlock($1)",
            &[&crate::log::table::APPEND_LOCK],
        )
        .await
        .unwrap();
    for s in spawned {
        s.await.unwrap().unwrap();
    }
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    let deleted: bool = admin
        .query_one(
            "SELECT deleted FROM mesh.row_versions WHERE tbl = 'public.t' AND pk = '[[\"id\", \"1\"]]'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        (rows, deleted),
        (0, true),
        "the newer delete wins everywhere"
    );
    drop(admin);
    scratch::drop_database(&url).await;
}
