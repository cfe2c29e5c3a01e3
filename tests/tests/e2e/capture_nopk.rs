//! Tables without a primary key: inserts are captured (and so replicate), while
//! UPDATE and DELETE through the proxy fail with a clear error that names the
//! table, because PostgreSQL refuses them on a published table without a replica
//! identity.

use anyhow::Result;
use pgmesh_tests::mesh::Region;
use pgmesh_tests::{connect, ProxyNode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_tables_capture_inserts_and_refuse_updates_by_name() -> Result<()> {
    let region = Region::start("solo").await?;
    region
        .admin
        .batch_execute("CREATE TABLE nokey (a int, b text)")
        .await?;
    region.init().await?.ok()?;
    let capture = region.capture("solo-1");
    let proxy = ProxyNode::start(&region.cluster).await?;
    let c = connect(&proxy.conn_string()).await?;
    c.execute("INSERT INTO nokey VALUES (1, 'x')", &[]).await?;
    for sql in [
        "UPDATE nokey SET b = 'y' WHERE a = 1",
        "DELETE FROM nokey WHERE a = 1",
    ] {
        let err = c.execute(sql, &[]).await.expect_err(sql);
        let db = err.as_db_error().expect("a server error");
        assert_eq!(db.code().code(), "55000", "{sql}: {db:?}");
        assert!(
            db.message().contains("\"nokey\""),
            "names the table: {}",
            db.message()
        );
    }
    // The session is still usable and the row is unchanged.
    let b: String = c
        .query_one("SELECT b FROM nokey WHERE a = 1", &[])
        .await?
        .get(0);
    assert_eq!(b, "x");

    // The insert is in the change log, once, with its whole row and no key.
    region.wait_caught_up().await?;
    let changes: Vec<_> = region
        .changelog()
        .await?
        .into_iter()
        .flat_map(|e| e.changes)
        .filter(|ch| ch.table == "public.nokey")
        .collect();
    assert_eq!(changes.len(), 1, "{changes:?}");
    let ch = &changes[0];
    assert_eq!(ch.op, "insert");
    assert!(ch.pk.is_empty(), "a table without a key has none: {ch:?}");
    assert_eq!(ch.new_value("a"), Some(Some("1".into())));
    assert_eq!(ch.new_value("b"), Some(Some("x".into())));
    capture.stop().await;
    Ok(())
}
