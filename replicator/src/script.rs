//! A round trip as one simple-protocol query: statements prepared once per
//! session with SQL `PREPARE`, run with `EXECUTE` and literal parameters.
//!
//! tokio-postgres ends every extended-protocol statement with a Sync, and PostgreSQL
//! flushes its answer at every Sync. A batch of a dozen pipelined statements so
//! comes back as a dozen network writes, and each one wakes the node (and, on a busy
//! machine, costs a context switch on both sides). A simple Query message that
//! carries several statements is answered with one flush at its end, so a round
//! trip costs one wake-up on each side whatever it holds. The values are the same
//! text the extended protocol would send (see `crate::apply::exec`): quoted as literals of unknown
//! type, each is parsed by its parameter's type input function, as before.
//!
//! A statement that fails ends the script: the statements after it do not run, and
//! an open transaction is left aborted for the caller to roll back.

use std::collections::HashMap;

use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow};

use crate::apply::sql::quote;

/// SQL-level prepared statements of one session, by text. Names do not collide with
/// tokio-postgres's own (`s0`, `s1`, ...). Used by apply and by capture's append.
#[derive(Debug, Default)]
pub struct Named {
    map: HashMap<String, String>,
}

impl Named {
    /// The name of `sql`'s prepared statement, preparing it (one round trip) on
    /// first use. A statement belongs to the session it was prepared in.
    pub async fn get(&mut self, c: &Client, sql: &str) -> Result<String, tokio_postgres::Error> {
        if let Some(n) = self.map.get(sql) {
            return Ok(n.clone());
        }
        let name = format!("pgmesh_{}", self.map.len());
        c.batch_execute(&format!("PREPARE {name} AS {sql}")).await?;
        self.map.insert(sql.to_string(), name.clone());
        Ok(name)
    }
}

/// The statements of one round trip, in order.
#[derive(Debug, Default)]
pub struct Script {
    text: String,
    count: usize,
}

impl Script {
    /// A statement without parameters (`BEGIN`, `COMMIT`). Returns its position.
    pub fn raw(&mut self, sql: &str) -> usize {
        self.text.push_str(sql);
        self.text.push_str(";\n");
        self.count += 1;
        self.count - 1
    }

    /// `EXECUTE name(values)`: each value a literal already (see [`quote`]).
    /// Returns the statement's position.
    pub fn execute<S: AsRef<str>>(&mut self, name: &str, values: &[S]) -> usize {
        self.text.push_str("EXECUTE ");
        self.text.push_str(name);
        if !values.is_empty() {
            self.text.push('(');
            for (i, v) in values.iter().enumerate() {
                if i > 0 {
                    self.text.push_str(", ");
                }
                self.text.push_str(v.as_ref());
            }
            self.text.push(')');
        }
        self.text.push_str(";\n");
        self.count += 1;
        self.count - 1
    }

    /// [`Self::execute`] with text values (NULL for `None`).
    pub fn execute_text<'a>(
        &mut self,
        name: &str,
        values: impl IntoIterator<Item = Option<&'a str>>,
    ) -> usize {
        let lits: Vec<String> = values.into_iter().map(quote).collect();
        self.execute(name, &lits)
    }

    /// Runs the script in one round trip; returns each statement's rows.
    pub async fn run(self, c: &Client) -> Result<Vec<Vec<SimpleQueryRow>>, tokio_postgres::Error> {
        if self.count == 0 {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(self.count);
        let mut rows = Vec::new();
        for m in c.simple_query(&self.text).await? {
            match m {
                SimpleQueryMessage::Row(r) => rows.push(r),
                SimpleQueryMessage::CommandComplete(_) => out.push(std::mem::take(&mut rows)),
                _ => {}
            }
        }
        Ok(out)
    }
}

/// Column `i` of a text row as a number (0 for NULL or anything else).
pub fn int(r: &SimpleQueryRow, i: usize) -> i64 {
    opt_int(r, i).unwrap_or(0)
}

/// Column `i` of a text row as a number, `None` for NULL.
pub fn opt_int(r: &SimpleQueryRow, i: usize) -> Option<i64> {
    r.get(i).and_then(|s| s.parse().ok())
}

/// Column `i` of a text row as a boolean (`t`).
pub fn boolean(r: &SimpleQueryRow, i: usize) -> bool {
    r.get(i) == Some("t")
}

/// Column `i` of a text row, an `int8[]`, as numbers.
pub fn int_array(r: &SimpleQueryRow, i: usize) -> Vec<i64> {
    r.get(i)
        .map(|s| {
            s.trim_matches(|c| c == '{' || c == '}')
                .split(',')
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Column `i` of a text row, a one-dimensional `text[]`, as strings (a NULL element
/// as the empty string): PostgreSQL's array output, quoted elements unescaped.
pub fn text_array(r: &SimpleQueryRow, i: usize) -> Vec<String> {
    let Some(s) = r.get(i) else {
        return Vec::new();
    };
    parse_text_array(s)
}

fn parse_text_array(s: &str) -> Vec<String> {
    let inner = s.strip_prefix('{').and_then(|s| s.strip_suffix('}'));
    let Some(inner) = inner.filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut chars = inner.chars();
    loop {
        let mut item = String::new();
        let mut quoted = false;
        let mut next = chars.next();
        if next == Some('"') {
            quoted = true;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => item.extend(chars.next()),
                    '"' => break,
                    c => item.push(c),
                }
            }
            next = chars.next();
        }
        while let Some(c) = next.filter(|&c| c != ',') {
            item.push(c);
            next = chars.next();
        }
        out.push(if !quoted && item == "NULL" {
            String::new()
        } else {
            item
        });
        if next.is_none() {
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_list_statements_with_literal_values() {
        let mut s = Script::default();
        assert_eq!(s.raw("BEGIN"), 0);
        assert_eq!(s.execute_text("p1", [Some("it's"), None]), 1);
        assert_eq!(s.execute::<&str>("p2", &[]), 2);
        assert_eq!(s.count, 3);
        assert_eq!(s.text, "BEGIN;\nEXECUTE p1('it''s', NULL);\nEXECUTE p2;\n");
    }

    #[test]
    fn text_arrays_parse_as_postgres_prints_them() {
        assert_eq!(parse_text_array("{}"), Vec::<String>::new());
        assert_eq!(parse_text_array("{r1,r2}"), ["r1", "r2"]);
        assert_eq!(
            parse_text_array(r#"{"a b","c,d","e\"f\\",NULL,"NULL"}"#),
            ["a b", "c,d", "e\"f\\", "", "NULL"]
        );
    }
}
