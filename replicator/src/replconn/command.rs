//! Text of the replication commands this client sends, with safe quoting.
//!
//! This file owns building `START_REPLICATION SLOT ... LOGICAL ...` and parsing
//! the `IDENTIFY_SYSTEM` result. Quoting follows the walsender's own scanner
//! (`repl_scanner.l`): identifiers in double quotes with `""` for a quote, and
//! string literals in single quotes with `''` for a quote. Backslashes are literal
//! there, so the SQL-side `E'...'` escaping (and postgres-protocol's `escape`
//! module) would be wrong. It must never paste a caller's string into a command
//! unquoted.

use crate::pgoutput::Lsn;

use super::ReplError;

/// `"name"` with embedded double quotes doubled.
pub fn quote_identifier(name: &str) -> Result<String, ReplError> {
    if name.is_empty() {
        return Err(ReplError::InvalidArgument("empty identifier".into()));
    }
    check_nul(name)?;
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// `'value'` with embedded single quotes doubled.
pub fn quote_literal(value: &str) -> Result<String, ReplError> {
    check_nul(value)?;
    Ok(format!("'{}'", value.replace('\'', "''")))
}

fn check_nul(s: &str) -> Result<(), ReplError> {
    if s.contains('\0') {
        Err(ReplError::InvalidArgument(
            "replication command argument contains a NUL byte".into(),
        ))
    } else {
        Ok(())
    }
}

/// `START_REPLICATION SLOT "slot" LOGICAL X/X ("name" 'value', ...)`.
pub fn start_logical(
    slot: &str,
    start_lsn: Lsn,
    options: &[(&str, &str)],
) -> Result<String, ReplError> {
    let mut cmd = format!(
        "START_REPLICATION SLOT {} LOGICAL {start_lsn}",
        quote_identifier(slot)?
    );
    if !options.is_empty() {
        let opts = options
            .iter()
            .map(|(name, value)| {
                Ok(format!(
                    "{} {}",
                    quote_identifier(name)?,
                    quote_literal(value)?
                ))
            })
            .collect::<Result<Vec<_>, ReplError>>()?;
        cmd.push_str(" (");
        cmd.push_str(&opts.join(", "));
        cmd.push(')');
    }
    Ok(cmd)
}

/// The result of `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifySystem {
    /// The cluster's system identifier, fixed when initdb ran.
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlog_pos: Lsn,
    /// The connected database (`None` for a physical replication connection).
    pub dbname: Option<String>,
}

impl IdentifySystem {
    /// Builds it from the rows `simple_query("IDENTIFY_SYSTEM")` returns.
    pub fn from_rows(rows: &[Vec<Option<String>>]) -> Result<Self, ReplError> {
        let bad = |reason| ReplError::Malformed { tag: b'D', reason };
        let [row] = rows else {
            return Err(bad("IDENTIFY_SYSTEM did not return exactly one row"));
        };
        let [Some(system_id), Some(timeline), Some(xlog_pos), dbname] = row.as_slice() else {
            return Err(bad(
                "IDENTIFY_SYSTEM row is not (systemid, timeline, xlogpos, dbname)",
            ));
        };
        Ok(IdentifySystem {
            system_id: system_id.clone(),
            timeline: timeline
                .parse()
                .map_err(|_| bad("IDENTIFY_SYSTEM timeline is not a number"))?,
            xlog_pos: xlog_pos.parse()?,
            dbname: dbname.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_start_replication_with_quoted_options() {
        let cmd = start_logical(
            "pgmesh_eu",
            Lsn(0x1_0000_16B3),
            &[
                ("proto_version", "1"),
                ("publication_names", "pub"),
                ("messages", "true"),
            ],
        )
        .unwrap();
        assert_eq!(
            cmd,
            "START_REPLICATION SLOT \"pgmesh_eu\" LOGICAL 1/000016B3 \
             (\"proto_version\" '1', \"publication_names\" 'pub', \"messages\" 'true')"
        );
    }

    #[test]
    fn quotes_hostile_names() {
        assert_eq!(quote_identifier("a\"b").unwrap(), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's \\n").unwrap(), "'it''s \\n'");
        let cmd = start_logical("s", Lsn::INVALID, &[("publication_names", "a','b")]).unwrap();
        assert_eq!(
            cmd,
            "START_REPLICATION SLOT \"s\" LOGICAL 0/00000000 (\"publication_names\" 'a'',''b')"
        );
        assert!(start_logical("", Lsn::INVALID, &[]).is_err());
        assert!(start_logical("s\0", Lsn::INVALID, &[]).is_err());
        assert!(start_logical("s", Lsn::INVALID, &[("x", "\0")]).is_err());
    }

    #[test]
    fn no_parentheses_without_options() {
        assert_eq!(
            start_logical("s", Lsn(0x16B3748), &[]).unwrap(),
            "START_REPLICATION SLOT \"s\" LOGICAL 0/016B3748"
        );
    }

    #[test]
    fn parses_identify_system() {
        let rows = vec![vec![
            Some("7301234567890123456".to_owned()),
            Some("1".to_owned()),
            Some("0/16B3748".to_owned()),
            Some("postgres".to_owned()),
        ]];
        let id = IdentifySystem::from_rows(&rows).unwrap();
        assert_eq!(id.timeline, 1);
        assert_eq!(id.xlog_pos, Lsn(0x16B3748));
        assert_eq!(id.dbname.as_deref(), Some("postgres"));
        assert!(IdentifySystem::from_rows(&[]).is_err());
    }
}
