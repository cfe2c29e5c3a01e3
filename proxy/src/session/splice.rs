//! Stamping in the simple protocol: the stamp statement is spliced into the query
//! text where a transaction that wrote ends, and its answer (a RowDescription with the
//! stamper's alias, a DataRow, a CommandComplete) is recognised and swallowed.
//!
//! Part of the relay: it shares the relay's state and never touches sockets.

use pgmesh_sql::{lexer::split_statements, Kind};

use super::super::stamp::read_cstr;
use super::Relay;

impl Relay {
    /// Tracks the statements of a simple query and splices stamp statements in
    /// where transactions that wrote end. Returns the new text if it changed.
    pub(super) fn rewrite_query(&mut self, text: &[u8]) -> Option<String> {
        let sql = String::from_utf8_lossy(text);
        let ranges = split_statements(&sql);
        let kinds: Vec<Kind> = ranges
            .iter()
            .map(|r| pgmesh_sql::classify(&sql[r.clone()]))
            .collect();
        // Statements that cannot run in a transaction block must not gain company.
        let may_splice = self.stamper.is_some() && !kinds.contains(&Kind::NoTxBlock);
        let mut cuts = Vec::new();
        for (r, &k) in ranges.iter().zip(&kinds) {
            if self.track.statement(k) && may_splice {
                cuts.push(r.start);
            }
        }
        if self.track.end_implicit() && may_splice {
            cuts.push(sql.len());
        }
        if cuts.is_empty() {
            return None;
        }
        let stamper = self.stamper.clone()?;
        let mut outq = String::with_capacity(sql.len() + 256 * cuts.len());
        let mut at = 0;
        self.splices.clear();
        for pos in cuts {
            let payload = match stamper.payload(&self.info) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot stamp transaction");
                    continue;
                }
            };
            outq.push_str(&sql[at..pos]);
            let start = outq.chars().count();
            if pos == sql.len() {
                outq.push(';');
            }
            outq.push_str(&stamper.statement(&payload));
            if pos < sql.len() {
                outq.push(';');
            }
            self.splices.push((start, outq.chars().count() - start));
            at = pos;
            self.simple_stamps += 1;
        }
        outq.push_str(&sql[at..]);
        Some(outq)
    }

    /// Recognises and swallows the answer to a stamp spliced into a simple query:
    /// a RowDescription with the stamper's alias, its DataRow, its CommandComplete.
    pub(super) fn simple_stamp_answer(&mut self, tag: u8, body: &[u8]) -> bool {
        if self.simple_stamps == 0 {
            return false;
        }
        if self.in_stamp_answer {
            match tag {
                b'D' => return true,
                b'C' => {
                    self.in_stamp_answer = false;
                    self.simple_stamps -= 1;
                    return true;
                }
                _ => self.in_stamp_answer = false,
            }
        }
        if tag == b'T' && self.is_stamp_row_description(body) {
            self.in_stamp_answer = true;
            return true;
        }
        false
    }

    fn is_stamp_row_description(&self, body: &[u8]) -> bool {
        let Some(stamper) = &self.stamper else {
            return false;
        };
        body.len() > 2
            && body[..2] == [0, 1]
            && read_cstr(&body[2..]).is_some_and(|(name, _)| name == stamper.alias().as_bytes())
    }
}
