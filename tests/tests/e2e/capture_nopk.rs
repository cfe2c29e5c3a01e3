//! Tables without a primary key: inserts are captured (and so replicate), while
//! UPDATE and DELETE through the proxy fail with a clear error that names the
//! table, because PostgreSQL refuses them on a published table without a replica
//! identity.

use anyhow::Result;
use pgmesh_replicator::catalog::{self, TableSelection};
use pgmesh_tests::{connect, ClusterOptions, PgCluster, ProxyNode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_tables_capture_inserts_and_refuse_updates_by_name() -> Result<()> {
    let cluster = PgCluster::start_async(ClusterOptions::default()).await?;
    let admin = cluster.connect().await?;
    admin
        .batch_execute("CREATE TABLE nokey (a int, b text)")
        .await?;
    catalog::init(&cluster.url("postgres"), "solo", &TableSelection::default()).await?;
    let proxy = ProxyNode::start(&cluster).await?;
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
    Ok(())
}
