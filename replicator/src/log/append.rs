//! Capture's append of local events ([`TableLog::append_local`]), in two round trips
//! of one simple query each (see `crate::script`): the lock, the versions and the
//! leader epoch; then the log rows, the new versions and COMMIT.

use super::table::{append_params, logged_as, APPEND_LOCK, APPEND_STORE, LOCK};
use super::{fence, versions, LogError, Logged, TableLog};
use crate::apply::sql::quote;
use crate::event::ChangeEvent;
use crate::script::{self, Script};

impl TableLog {
    /// Appends local events from capture: in one transaction, stamps each change with
    /// the row version it overwrote, logs the events, and records the new versions.
    /// Returns the rows it logged, for [`super::tail::Tail::publish`].
    pub async fn append_local(
        &mut self,
        events: &mut Vec<ChangeEvent>,
    ) -> Result<Vec<Logged>, LogError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let r = self.append_script(events).await;
        if r.is_err() {
            // The transaction may still be open (and aborted): end it. If it ended
            // already, this only draws a warning.
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        r
    }

    async fn append_script(
        &mut self,
        events: &mut Vec<ChangeEvent>,
    ) -> Result<Vec<Logged>, LogError> {
        let c = &self.client;
        let lock = self.named.get(c, LOCK).await?;
        let load = self.named.get(c, versions::LOAD).await?;
        let append = self.named.get(c, &APPEND_STORE).await?;
        let mut first = Script::default();
        first.raw("BEGIN");
        first.execute(&lock, &[quote(Some(&APPEND_LOCK.to_string()))]);
        let at_load = first.execute(&load, &versions::load_literals(&versions::keys_of(events)));
        let at_epoch = match &self.fence {
            Some(f) => {
                let epoch = self.named.get(c, fence::CURRENT).await?;
                Some(first.execute(&epoch, &[quote(Some(&f.region))]))
            }
            None => None,
        };
        let answers = first.run(c).await?;
        let rows = |i: usize| answers.get(i).map(Vec::as_slice).unwrap_or_default();
        let current = versions::from_text_rows(rows(at_load));
        if let (Some(f), Some(i)) = (&self.fence, at_epoch) {
            let now = rows(i).first().map_or(0, |r| script::int(r, 0));
            if now != f.epoch {
                return Err(f.lost(now));
            }
        }
        let touched = versions::advance_local(events, current);
        let mut values = append_params(events).literals();
        values.extend(versions::StoreParams::new(&touched).literals());
        let mut second = Script::default();
        let at_append = second.execute(&append, &values);
        second.raw("COMMIT");
        let answers = second.run(c).await?;
        let row = answers
            .get(at_append)
            .and_then(|rows| rows.first())
            .ok_or_else(|| LogError::Unavailable("the append returned no row".into()))?;
        Ok(logged_as(
            std::mem::take(events),
            script::int_array(row, 0),
            script::text_array(row, 1),
            script::int_array(row, 2),
        ))
    }
}
