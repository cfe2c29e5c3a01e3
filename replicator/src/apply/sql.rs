//! SQL text for applying row changes.
//!
//! Statements are parameterised: values travel as text-format parameters (see
//! `exec`), so the target column's type parses them exactly as the origin printed
//! them (no numeric or binary round trip). Identifiers are always double-quoted.
//! This module builds strings; it never executes them.

use std::fmt::Write;

/// Double-quotes an identifier.
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `schema.table` as a quoted name.
pub fn table(name: &str) -> String {
    match name.split_once('.') {
        Some((s, t)) => format!("{}.{}", ident(s), ident(t)),
        None => ident(name),
    }
}

fn where_params(out: &mut String, cols: &[&str], first: usize) {
    out.push_str(" WHERE ");
    for (i, c) in cols.iter().enumerate() {
        if i > 0 {
            out.push_str(" AND ");
        }
        let _ = write!(out, "{} = ${}", ident(c), first + i);
    }
}

/// `SELECT xmin, age(xmin) ... FOR UPDATE` of one row: locks it and says whether it
/// exists and which transaction wrote it last. Parameters are the key columns.
pub fn lock(tbl: &str, pk: &[&str]) -> String {
    let mut s = format!(
        "SELECT xmin::text::int8, age(xmin)::int8 FROM {}",
        table(tbl)
    );
    where_params(&mut s, pk, 1);
    s.push_str(" FOR UPDATE");
    s
}

/// Prepared `INSERT`: parameters are the columns.
pub fn insert(tbl: &str, cols: &[&str]) -> String {
    let names: Vec<String> = cols.iter().map(|c| ident(c)).collect();
    let params: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
    format!(
        "INSERT INTO {} ({}) VALUES ({})",
        table(tbl),
        names.join(", "),
        params.join(", ")
    )
}

/// Prepared `UPDATE`: parameters are the set columns, then the key columns.
pub fn update(tbl: &str, cols: &[&str], pk: &[&str]) -> String {
    let sets: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} = ${}", ident(c), i + 1))
        .collect();
    let mut s = format!("UPDATE {} SET {}", table(tbl), sets.join(", "));
    where_params(&mut s, pk, cols.len() + 1);
    s
}

/// Prepared `DELETE`: parameters are the key columns.
pub fn delete(tbl: &str, pk: &[&str]) -> String {
    let mut s = format!("DELETE FROM {}", table(tbl));
    where_params(&mut s, pk, 1);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_statements() {
        assert_eq!(
            update("public.t", &["v", "w"], &["id"]),
            r#"UPDATE "public"."t" SET "v" = $1, "w" = $2 WHERE "id" = $3"#
        );
        assert_eq!(
            insert("t", &["a", "b"]),
            r#"INSERT INTO "t" ("a", "b") VALUES ($1, $2)"#
        );
        assert_eq!(
            delete("s.t", &["a", "b"]),
            r#"DELETE FROM "s"."t" WHERE "a" = $1 AND "b" = $2"#
        );
        assert_eq!(
            lock("t", &["a"]),
            r#"SELECT xmin::text::int8, age(xmin)::int8 FROM "t" WHERE "a" = $1 FOR UPDATE"#
        );
    }
}
