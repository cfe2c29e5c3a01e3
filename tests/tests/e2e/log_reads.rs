//! The change log's read paths against a real database: the SQL that picks what a
//! peer may receive agrees with [`ShipFilter::ships`], the notifier of a non-hub
//! node ignores appends of other origins, and the per-key lookups of apply and
//! capture stay index probes under cached generic plans (as plain joins they had
//! become full scans, 8-9 ms per batch in the replication benchmark).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use pgmesh_replicator::apply::LOGGED;
use pgmesh_replicator::catalog;
use pgmesh_replicator::event::{Change, ChangeEvent, Op};
use pgmesh_replicator::hlc::Hlc;
use pgmesh_replicator::log::notify::LogNotifier;
use pgmesh_replicator::log::tail::Tail;
use pgmesh_replicator::log::versions::LOAD;
use pgmesh_replicator::log::{ChangeLog, ShipFilter, TableLog};
use pgmesh_tests::mesh::Region;
use pgmesh_tests::wait_until;

fn event(origin: &str, n: u64, local_only: bool) -> ChangeEvent {
    ChangeEvent {
        origin: origin.into(),
        hlc: Hlc::from_parts(1_700_000_000_000 + n, 0),
        source_lsn: n * 16,
        xid: n as u32,
        commit_ts_us: 0,
        stamp: None,
        local_only,
        changes: vec![],
    }
}

#[tokio::test]
async fn serve_filter_in_sql_matches_the_ship_rule() -> Result<()> {
    let region = Region::start_initialized("lr_a").await?;
    let mut log = TableLog::new(catalog::connect(&region.url()).await?).await?;
    let events = vec![
        event("lr_a", 1, false),
        event("lr_a", 2, true),
        event("lr_b", 3, false),
        event("lr_c", 4, false),
        event("lr_c", 5, true),
        event("lr_a", 6, false),
    ];
    log.append(&events).await?;
    let all = log.read_after(0, 100).await?;
    assert_eq!(all.len(), events.len());
    let last = all.last().unwrap().seq;
    for relay in [false, true] {
        for peer in ["lr_b", "lr_c", "lr_z"] {
            let filter = ShipFilter {
                server_region: "lr_a".into(),
                relay,
                peer_region: peer.into(),
            };
            let scan = log.read_for(0, 100, &filter).await?;
            let expected: Vec<_> = all
                .iter()
                .filter(|l| filter.ships(&l.event))
                .cloned()
                .collect();
            assert!(!expected.is_empty());
            assert_eq!(scan.events, expected, "relay {relay}, peer {peer}");
            assert_eq!(
                scan.upto,
                Some(last),
                "the read covers every row it scanned"
            );
        }
    }
    // A limit bounds the rows scanned, shipped or not; after the end there is nothing.
    let filter = ShipFilter {
        server_region: "lr_a".into(),
        relay: false,
        peer_region: "lr_b".into(),
    };
    let scan = log.read_for(all[0].seq, 2, &filter).await?;
    assert_eq!(scan.upto, Some(all[2].seq));
    assert!(
        scan.events.is_empty(),
        "rows 2 and 3 are local-only and lr_b's own"
    );
    assert_eq!(log.read_for(last, 10, &filter).await?.upto, None);
    Ok(())
}

#[tokio::test]
async fn origin_notifier_ignores_other_origins() -> Result<()> {
    let region = Region::start_initialized("lr_n").await?;
    let mut log = TableLog::new(catalog::connect(&region.url()).await?).await?;
    // A node's notifier, as a server that ships only its own events runs it.
    let tail = Arc::new(Tail::new(0));
    let mut rx = tail.subscribe();
    let task = LogNotifier::start_on(&region.url(), "lr_n", false, tail.clone());
    // The bump after connecting.
    tokio::time::timeout(Duration::from_secs(20), rx.changed()).await??;
    let before = *rx.borrow_and_update();
    // Notifications arrive in commit order, so once the local append is noted the
    // peer's before it was handled too: it must not have woken anyone.
    log.append(&[event("lr_peer", 1, false)]).await?;
    log.append(&[event("lr_n", 2, false)]).await?;
    let local: i64 = region
        .admin
        .query_one("SELECT max(seq) FROM mesh.changelog", &[])
        .await?
        .get(0);
    wait_until(
        Duration::from_secs(20),
        "the local append to be noted",
        || {
            let noted = tail.noted();
            async move { noted >= local }
        },
    )
    .await?;
    assert_eq!(*rx.borrow_and_update(), before + 1);
    task.abort();
    Ok(())
}

/// The lines of `EXPLAIN EXECUTE probe(args)`.
async fn explain(c: &tokio_postgres::Client, args: &str) -> Result<String> {
    Ok(c.simple_query(&format!("EXPLAIN EXECUTE probe({args})"))
        .await?
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// The generic plan PostgreSQL caches for `sql` while `mesh.row_versions` and
/// `mesh.changelog` are nearly empty (as on a fresh install), as it still runs after
/// both have grown: growth alone never makes PostgreSQL plan again.
async fn stale_generic_plan(sql: &str, types: &str, args: &str) -> Result<String> {
    let region = Region::start_initialized("lr_p").await?;
    let c = &region.admin;
    c.batch_execute("SET plan_cache_mode = force_generic_plan")
        .await?;
    c.batch_execute(&format!("PREPARE probe({types}) AS {sql}"))
        .await?;
    explain(c, args).await?;
    c.batch_execute(
        "INSERT INTO mesh.row_versions (tbl, pk, hlc, origin, deleted, xid)
           SELECT 'public.t', jsonb_build_array(jsonb_build_array('id', g::text))::text, g, 1, false, g
           FROM generate_series(1, 20000) g;
         INSERT INTO mesh.changelog (origin, hlc, source_lsn, xid, commit_ts, stamped, changes)
           SELECT 'lr_q', g, ('0/' || to_hex(g * 16))::pg_lsn, g, now(), false, '[]'
           FROM generate_series(1, 20000) g;",
    )
    .await?;
    explain(c, args).await
}

#[tokio::test]
async fn version_lookup_stays_an_index_probe() -> Result<()> {
    let plan = stale_generic_plan(
        LOAD,
        "text[], text[]",
        r#"'{public.t}', '{"[[\"id\", \"7\"]]"}'"#,
    )
    .await?;
    assert!(
        plan.contains("Index") && !plan.contains("Seq Scan on row_versions"),
        "version lookup plan:\n{plan}"
    );
    Ok(())
}

#[tokio::test]
async fn dedup_lookup_stays_an_index_probe() -> Result<()> {
    let plan = stale_generic_plan(LOGGED, "text[], int8[]", "'{lr_q}', '{7}'").await?;
    assert!(
        plan.contains("Index") && !plan.contains("Seq Scan on changelog"),
        "dedup lookup plan:\n{plan}"
    );
    Ok(())
}

#[tokio::test]
async fn version_keys_print_as_jsonb_prints_them() -> Result<()> {
    // Keys stored before the column became text were converted with `pk::text`;
    // keys built by apply and capture must be the same bytes.
    let region = Region::start("lr_k").await?;
    let tricky = [
        "plain",
        "",
        "quote \" and backslash \\",
        "tab\tnewline\ncr\rbell\u{7}del\u{7f}",
        "unicode é ✓ 😀",
        "slash / and {braces}, [brackets]",
    ];
    for (i, v) in tricky.iter().enumerate() {
        let change = Change {
            table: "public.t".into(),
            op: Op::Update,
            pk: vec![
                ("id".into(), Some(i.to_string())),
                ("name \"odd\"".into(), Some(v.to_string())),
                ("n".into(), None),
            ],
            old: None,
            new: None,
            unchanged: vec![],
            types: vec![],
            prev: None,
        };
        let ours = change.key_json();
        let theirs: String = region
            .admin
            .query_one("SELECT $1::text::jsonb::text", &[&ours])
            .await?
            .get(0);
        assert_eq!(ours, theirs, "key of {v:?}");
    }
    Ok(())
}
