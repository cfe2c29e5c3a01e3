//! Awkward values and keys replicate bit for bit, through apply's literal values.
//!
//! Apply sends each batch as SQL text (`EXECUTE` with quoted literals, see
//! `pgmesh_replicator::script`), so every value a peer applies passes through the
//! quoting. Two regions: the rows of `capture_values` (jsonb, every byte in a bytea,
//! emoji, arrays with quotes and NULLs, a TOASTed text, special numerics) and a table
//! keyed by texts with quotes, backslashes, dollar quotes and SQL, written in one
//! region; then updates (one that leaves the TOASTed column alone) and deletes by
//! those keys from the other; then concurrent updates of the same keys in both, so
//! conflicts are recorded with the keys. After each step both regions hold
//! byte-identical rows, and each region's conflict records name exactly the keys
//! written in both.
//!
//! A transaction larger than a link frame (64 MiB) replicates too: it travels alone in
//! a larger frame instead of stopping its link.

use std::collections::BTreeSet;

use anyhow::{ensure, Result};
use pgmesh_tests::regions::{Mesh, NodeSpec, CONVERGE_TIMEOUT};

use crate::capture_values::{ROWS, SCHEMA};

const KEYS: &[&str] = &[
    "it's",
    r"back\slash",
    "\"dq\"",
    "é🎉 日本語",
    "$$x$$",
    "'); DROP TABLE tk; --",
    "a,b{c}",
    "NULL",
    "",
    "line\nbreak\ttab",
];

#[tokio::test]
async fn awkward_values_and_keys_replicate_bit_for_bit() -> Result<()> {
    let mut mesh = Mesh::start(&["va", "vb"]).await?;
    mesh.exec_all(SCHEMA).await?;
    mesh.exec_all("CREATE TABLE tk (k text PRIMARY KEY, v text, n int DEFAULT 0)")
        .await?;
    mesh.init_all().await?;
    mesh.start_nodes(|_| NodeSpec::default()).await?;
    let a = mesh.connect_proxy(0).await?;
    let b = mesh.connect_proxy(1).await?;

    for row in ROWS {
        a.batch_execute(row).await?;
    }
    for k in KEYS {
        a.execute("INSERT INTO tk (k, v) VALUES ($1, $1 || E'\\\\ \\'')", &[k])
            .await?;
    }
    let sums = mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    ensure!(
        sums["public.vals"].starts_with(&format!("{}:", ROWS.len()))
            && sums["public.tk"].starts_with(&format!("{}:", KEYS.len())),
        "not every row arrived: {sums:?}"
    );

    // Updates and deletes by the awkward keys, from the other region.
    for (i, k) in KEYS.iter().enumerate() {
        let sql = if i % 2 == 0 {
            "UPDATE tk SET v = reverse(v), n = n + 1 WHERE k = $1"
        } else {
            "DELETE FROM tk WHERE k = $1"
        };
        ensure!(b.execute(sql, &[k]).await? == 1, "{sql} {k:?} in vb");
    }
    b.batch_execute(
        r#"UPDATE vals SET tx = E'o''k \\ "q" \n', ta = ARRAY['x''y', NULL, '\'] WHERE id = 1;
           DELETE FROM vals WHERE id = 3"#,
    )
    .await?;
    let sums = mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    ensure!(
        sums["public.vals"].starts_with(&format!("{}:", ROWS.len() - 1))
            && sums["public.tk"].starts_with(&format!("{}:", KEYS.len().div_ceil(2))),
        "updates and deletes: {sums:?}"
    );

    // The same keys updated in both regions while their links are paused.
    mesh.pause_link(0, "vb").await?;
    mesh.pause_link(1, "va").await?;
    for (c, tag) in [(&a, "from a ' "), (&b, r"from b \ ")] {
        for k in KEYS.iter().step_by(2) {
            c.execute("UPDATE tk SET v = $2 || k WHERE k = $1", &[k, &tag])
                .await?;
        }
    }
    mesh.resume_link(0, "vb").await?;
    mesh.resume_link(1, "va").await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    let want: BTreeSet<String> = KEYS.iter().step_by(2).map(|k| k.to_string()).collect();
    for i in 0..2 {
        let got: BTreeSet<String> = mesh
            .region(i)
            .admin
            .query(
                "SELECT DISTINCT pk->0->>1 FROM mesh.conflicts WHERE tbl = 'public.tk'",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        ensure!(
            got == want,
            "conflicts in {}: keys {got:?}, expected {want:?}",
            mesh.region(i).name
        );
    }
    mesh.shutdown().await;
    Ok(())
}

/// One source transaction is one event; this one is above the link's 64 MiB frame.
#[tokio::test]
async fn a_transaction_larger_than_a_link_frame_replicates() -> Result<()> {
    let mut mesh = Mesh::start(&["wa", "wb"]).await?;
    mesh.exec_all("CREATE TABLE big (id int PRIMARY KEY, body text)")
        .await?;
    mesh.init_all().await?;
    mesh.start_nodes(|_| NodeSpec::default()).await?;
    let a = mesh.connect_proxy(0).await?;
    // 5 rows of 14 MiB: 70 MiB in one event; then a small event after it.
    a.batch_execute(
        "INSERT INTO big SELECT g, repeat(md5(g::text), 14 * 1024 * 1024 / 32)
           FROM generate_series(1, 5) g",
    )
    .await?;
    a.batch_execute("INSERT INTO big VALUES (6, 'after')")
        .await?;
    let sums = mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    ensure!(
        sums["public.big"].starts_with("6:"),
        "not every row arrived: {sums:?}"
    );
    let bytes: i64 = mesh
        .region(1)
        .admin
        .query_one("SELECT sum(length(body))::int8 FROM big", &[])
        .await?
        .get(0);
    ensure!(
        bytes == 5 * 14 * 1024 * 1024 + 5,
        "wb holds {bytes} bytes of bodies"
    );
    mesh.shutdown().await;
    Ok(())
}
