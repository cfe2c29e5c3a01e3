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

/// `SELECT 1, xmin, age(xmin) ... FOR UPDATE` of one row: locks it and says whether
/// it exists and which transaction wrote it last (1 is its position, as in
/// [`lock_many`]). Parameters are the key columns.
pub fn lock(tbl: &str, pk: &[&str]) -> String {
    let mut s = format!(
        "SELECT 1::int8, xmin::text::int8, age(xmin)::int8 FROM {}",
        table(tbl)
    );
    where_params(&mut s, pk, 1);
    s.push_str(" FOR UPDATE");
    s
}

/// `sql` with every parameter `$n` renumbered to `$(n + by)`, so that statements can
/// be combined into one. `sql` must hold no `$` but in parameters (no dollar quotes).
pub fn shift_params(sql: &str, by: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if let Ok(n) = rest[..digits].parse::<usize>() {
            out.push_str(&(n + by).to_string());
            rest = &rest[digits..];
        }
    }
    out.push_str(rest);
    out
}

/// `SELECT ... FOR UPDATE` of every row of a one-column key given as the array `$1`:
/// locks them and returns, for each that exists, its 1-based position in `$1`, the
/// transaction that wrote it last and that transaction's age.
pub fn lock_many(tbl: &str, key: &str) -> String {
    let k = ident(key);
    format!(
        "SELECT array_position($1, {k})::int8, xmin::text::int8, age(xmin)::int8 FROM {} \
         WHERE {k} = ANY($1) FOR UPDATE",
        table(tbl)
    )
}

/// A PostgreSQL array literal of `values` in text form (`{"1","2"}`): every element
/// quoted, so it parses as an array of any element type. `None` is NULL.
pub fn array_literal(values: &[&Option<String>]) -> String {
    array_text(values.iter().map(|v| v.as_deref()))
}

/// [`array_literal`] of any text items.
pub fn array_text<I, S>(items: I) -> String
where
    I: IntoIterator<Item = Option<S>>,
    S: AsRef<str>,
{
    let mut s = String::from("{");
    for (i, v) in items.into_iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        match v {
            None => s.push_str("NULL"),
            Some(v) => {
                s.push('"');
                for ch in v.as_ref().chars() {
                    if ch == '"' || ch == '\\' {
                        s.push('\\');
                    }
                    s.push(ch);
                }
                s.push('"');
            }
        }
    }
    s.push('}');
    s
}

/// The SQL string literal of `v` (`NULL` for `None`), of type unknown, so it takes
/// the type of the parameter it is given to. Needs `standard_conforming_strings`
/// on (apply sessions set it): only quotes are doubled.
pub fn quote(v: Option<&str>) -> String {
    match v {
        None => "NULL".to_string(),
        Some(v) => format!("'{}'", v.replace('\'', "''")),
    }
}

/// [`quote`] of the array literal of numbers, booleans or other `Display` items.
pub fn quote_array<T: std::fmt::Display>(items: &[T]) -> String {
    quote(Some(&array_text(items.iter().map(|v| Some(v.to_string())))))
}

/// [`quote`] of the array literal of optional items.
pub fn quote_opt_array<T: std::fmt::Display>(items: &[Option<T>]) -> String {
    quote(Some(&array_text(
        items.iter().map(|v| v.as_ref().map(|v| v.to_string())),
    )))
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
    fn shifted_parameters_keep_everything_else() {
        assert_eq!(
            shift_params("SELECT $1, $10::int8, '$', $2x, é$3", 9),
            "SELECT $10, $19::int8, '$', $11x, é$12"
        );
        assert_eq!(shift_params("no params$", 3), "no params$");
    }

    #[test]
    fn array_literals_quote_every_element() {
        let (a, b, c) = (Some("1".to_string()), Some(r#"x"y\z"#.to_string()), None);
        assert_eq!(array_literal(&[&a, &b, &c]), r#"{"1","x\"y\\z",NULL}"#);
        assert_eq!(array_literal(&[]), "{}");
    }

    #[test]
    fn literals_double_quotes_only() {
        assert_eq!(quote(Some(r"it's \n")), r"'it''s \n'");
        assert_eq!(quote(None), "NULL");
        assert_eq!(quote_array(&[1i64, -2]), r#"'{"1","-2"}'"#);
        assert_eq!(quote_array(&[true, false]), r#"'{"true","false"}'"#);
        assert_eq!(quote_opt_array(&[Some(3i64), None]), r#"'{"3",NULL}'"#);
        assert_eq!(quote_array(&["o'k"]), r#"'{"o''k"}'"#);
    }

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
            r#"SELECT 1::int8, xmin::text::int8, age(xmin)::int8 FROM "t" WHERE "a" = $1 FOR UPDATE"#
        );
        assert_eq!(
            lock_many("public.t", "a"),
            r#"SELECT array_position($1, "a")::int8, xmin::text::int8, age(xmin)::int8 FROM "public"."t" WHERE "a" = ANY($1) FOR UPDATE"#
        );
    }
}
