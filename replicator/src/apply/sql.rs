//! SQL text for applying row changes.
//!
//! Values travel as PostgreSQL text and are written as quoted literals, so the
//! target column's type parses them exactly as the origin printed them (no numeric
//! or binary round trip). Identifiers are always double-quoted. The connection runs
//! with `standard_conforming_strings = on`, which is what makes doubling quotes the
//! complete escaping rule. This module builds strings; it never executes them.

use std::fmt::Write;

use crate::event::Value;

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

/// A text value as a SQL literal (or NULL).
pub fn literal(v: &Value) -> String {
    match v {
        None => "NULL".to_string(),
        Some(s) => format!("'{}'", s.replace('\'', "''")),
    }
}

fn where_key(out: &mut String, pk: &[(String, Value)]) {
    out.push_str(" WHERE ");
    for (i, (c, v)) in pk.iter().enumerate() {
        if i > 0 {
            out.push_str(" AND ");
        }
        let _ = write!(out, "{} = {}", ident(c), literal(v));
    }
}

/// `SELECT <tag>, xmin, age(xmin) FROM t WHERE key FOR UPDATE`: locks the row and
/// says if it exists and which transaction wrote it last.
pub fn lock(tbl: &str, pk: &[(String, Value)], tag: usize) -> String {
    let mut s = format!(
        "SELECT {tag}, xmin::text::int8, age(xmin) FROM {}",
        table(tbl)
    );
    where_key(&mut s, pk);
    s.push_str(" FOR UPDATE");
    s
}

/// `INSERT INTO t (cols) VALUES (...)`.
pub fn insert(tbl: &str, row: &[(String, Value)]) -> String {
    let cols: Vec<String> = row.iter().map(|(c, _)| ident(c)).collect();
    let vals: Vec<String> = row.iter().map(|(_, v)| literal(v)).collect();
    format!(
        "INSERT INTO {} ({}) VALUES ({})",
        table(tbl),
        cols.join(", "),
        vals.join(", ")
    )
}

/// `UPDATE t SET ... WHERE key`.
pub fn update(tbl: &str, pk: &[(String, Value)], row: &[(String, Value)]) -> String {
    let sets: Vec<String> = row
        .iter()
        .map(|(c, v)| format!("{} = {}", ident(c), literal(v)))
        .collect();
    let mut s = format!("UPDATE {} SET {}", table(tbl), sets.join(", "));
    where_key(&mut s, pk);
    s
}

/// `DELETE FROM t WHERE key`.
pub fn delete(tbl: &str, pk: &[(String, Value)]) -> String {
    let mut s = format!("DELETE FROM {}", table(tbl));
    where_key(&mut s, pk);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: Option<&str>) -> (String, Value) {
        (k.to_string(), v.map(str::to_string))
    }

    #[test]
    fn statements() {
        let pk = [kv("id", Some("1"))];
        assert_eq!(
            insert(
                "public.t",
                &[kv("id", Some("1")), kv("v", Some("it's")), kv("n", None)]
            ),
            r#"INSERT INTO "public"."t" ("id", "v", "n") VALUES ('1', 'it''s', NULL)"#
        );
        assert_eq!(
            update("public.t", &pk, &[kv("v", Some("x"))]),
            r#"UPDATE "public"."t" SET "v" = 'x' WHERE "id" = '1'"#
        );
        assert_eq!(
            delete("s.T\"", &pk),
            r#"DELETE FROM "s"."T""" WHERE "id" = '1'"#
        );
        assert_eq!(
            lock("public.t", &[kv("a", Some("1")), kv("b", Some("\\x00"))], 7),
            r#"SELECT 7, xmin::text::int8, age(xmin) FROM "public"."t" WHERE "a" = '1' AND "b" = '\x00' FOR UPDATE"#
        );
    }
}
