//! Transaction and response tracking for one session.
//!
//! `TxTrack` follows the client's transaction state from the statements it sends
//! (so it is right inside a pipeline) and resynchronises from ReadyForQuery when
//! nothing else is in flight. `Expectations` is a queue with one entry per client
//! message that the server will answer, which is how the relay knows exactly which
//! responses belong to messages the proxy injected and must be swallowed. Neither
//! ever touches bytes.

use std::collections::VecDeque;

use pgmesh_sql::Kind;

use crate::net::messages::TxStatus;

/// What the current transaction has done, as far as the proxy can tell.
#[derive(Debug, Default, Clone)]
pub struct TxTrack {
    /// Inside an explicit transaction block.
    pub in_block: bool,
    /// The block has failed (status `E`): its COMMIT will roll back.
    pub failed: bool,
    /// A statement that may write ran in the current transaction.
    pub wrote: bool,
}

impl TxTrack {
    /// Records a statement as it is sent. Returns true when the transaction ends
    /// with this statement and must be stamped right before it.
    pub fn statement(&mut self, kind: Kind) -> bool {
        match kind {
            Kind::Commit { chain } => self.end(chain, true),
            Kind::PrepareTransaction => self.end(false, true),
            Kind::Rollback { chain } => self.end(chain, false),
            Kind::Begin => {
                self.in_block = true;
                false
            }
            Kind::MayWrite => {
                self.wrote = true;
                false
            }
            // `pgmesh.replicate` is read by the server when the stamp runs.
            Kind::SetReplicate { .. } | Kind::Read | Kind::NoTxBlock | Kind::Neutral => false,
        }
    }

    fn end(&mut self, chain: bool, commit: bool) -> bool {
        // A COMMIT also ends an implicit transaction (a multi-statement query or a
        // pipeline without BEGIN), so `in_block` is not required.
        let stamp = commit && self.wrote && !self.failed;
        self.in_block = chain;
        self.failed = false;
        self.wrote = false;
        stamp
    }

    /// End of an implicit transaction (Sync, or the end of a simple Query). Returns
    /// true when it wrote outside a block, i.e. an autocommit write to stamp.
    pub fn end_implicit(&mut self) -> bool {
        if self.in_block {
            return false;
        }
        let stamp = self.wrote;
        self.wrote = false;
        stamp
    }

    /// Adopts the server's view after a ReadyForQuery with nothing else in flight.
    pub fn sync(&mut self, status: TxStatus) {
        self.in_block = status != TxStatus::Idle;
        self.failed = status == TxStatus::Failed;
        if status == TxStatus::Idle {
            self.wrote = false;
        }
    }
}

/// The kind of client message a server answer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaiting {
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    Query,
    FunctionCall,
}

impl Awaiting {
    /// Whether a server message with `tag` completes this request.
    pub fn is_done_by(self, tag: u8) -> bool {
        match self {
            Awaiting::Parse => tag == b'1',
            Awaiting::Bind => tag == b'2',
            Awaiting::Describe => matches!(tag, b'T' | b'n'),
            Awaiting::Execute => matches!(tag, b'C' | b'I' | b's'),
            Awaiting::Close => tag == b'3',
            Awaiting::Sync | Awaiting::Query | Awaiting::FunctionCall => tag == b'Z',
        }
    }

    /// Whether the request ends at a ReadyForQuery (and an error does not end it).
    fn ends_with_ready(self) -> bool {
        matches!(
            self,
            Awaiting::Sync | Awaiting::Query | Awaiting::FunctionCall
        )
    }

    /// The request a frontend message tag makes, if the server answers it.
    pub fn for_frontend(tag: u8) -> Option<Self> {
        Some(match tag {
            b'P' => Awaiting::Parse,
            b'B' => Awaiting::Bind,
            b'D' => Awaiting::Describe,
            b'E' => Awaiting::Execute,
            b'C' => Awaiting::Close,
            b'S' => Awaiting::Sync,
            b'Q' => Awaiting::Query,
            b'F' => Awaiting::FunctionCall,
            _ => return None,
        })
    }
}

/// One outstanding request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    pub what: Awaiting,
    /// Injected by the proxy: its answers are swallowed.
    pub injected: bool,
}

/// Outstanding requests in the order the server will answer them.
#[derive(Debug, Default)]
pub struct Expectations {
    queue: VecDeque<Expect>,
}

/// What to do with one server message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Drop the message instead of forwarding it.
    pub swallow: bool,
    /// A ReadyForQuery that leaves nothing in flight.
    pub settled: bool,
}

impl Expectations {
    pub fn push(&mut self, what: Awaiting, injected: bool) {
        self.queue.push_back(Expect { what, injected });
    }

    pub fn front(&self) -> Option<Expect> {
        self.queue.front().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Requests that end with ReadyForQuery still in flight.
    pub fn pending_ready(&self) -> usize {
        self.queue
            .iter()
            .filter(|e| e.what.ends_with_ready())
            .count()
    }

    /// Whether the answer to an injected request is next, so the next server message
    /// must be read whole and probably swallowed.
    pub fn injected_next(&self) -> bool {
        self.queue.front().is_some_and(|e| e.injected)
    }

    /// Accounts for one server message and says whether to swallow it.
    pub fn on_server(&mut self, tag: u8) -> Verdict {
        // Asynchronous messages belong to no request: always the client's.
        if matches!(tag, b'N' | b'A' | b'S') {
            return Verdict {
                swallow: false,
                settled: false,
            };
        }
        if tag == b'Z' {
            // Requests before the Sync this answers that are still unanswered were
            // skipped by the server after an error (it discards everything up to the
            // next Sync): they never get an answer. Such as a stamp injected at the
            // Sync of a COPY whose error arrived before the client's CopyDone.
            while self.front().is_some_and(|e| !e.what.ends_with_ready()) {
                self.queue.pop_front();
            }
        }
        let Some(front) = self.front() else {
            return Verdict {
                swallow: false,
                settled: tag == b'Z',
            };
        };
        if tag == b'E' && !front.what.ends_with_ready() {
            // The server skips every extended message up to the next Sync. An error
            // from an injected message is still shown: the client's COMMIT fails.
            while self.front().is_some_and(|e| !e.what.ends_with_ready()) {
                self.queue.pop_front();
            }
            return Verdict {
                swallow: false,
                settled: false,
            };
        }
        let swallow = front.injected && tag != b'E';
        if front.what.is_done_by(tag) {
            self.queue.pop_front();
        }
        Verdict {
            swallow,
            settled: tag == b'Z' && self.queue.is_empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order that hung a session: a COPY's error arrives before the client ends
    /// the copy, so the stamp injected at its Sync goes to a server that skips it.
    /// The ReadyForQuery still reaches the client and settles the session.
    #[test]
    fn requests_skipped_after_an_error_end_at_the_ready_for_query() {
        let mut e = Expectations::default();
        e.push(Awaiting::Bind, false);
        e.push(Awaiting::Execute, false);
        assert!(!e.on_server(b'2').swallow);
        assert!(!e.on_server(b'E').swallow, "the COPY's error");
        for w in [
            Awaiting::Parse,
            Awaiting::Bind,
            Awaiting::Execute,
            Awaiting::Close,
        ] {
            e.push(w, true);
        }
        e.push(Awaiting::Sync, false);
        e.push(Awaiting::Parse, false);
        e.push(Awaiting::Sync, false);
        let v = e.on_server(b'Z');
        assert!(
            !v.swallow && !v.settled,
            "the client's ReadyForQuery, one Sync left"
        );
        assert!(!e.on_server(b'1').swallow);
        let v = e.on_server(b'Z');
        assert!(!v.swallow && v.settled);
        assert!(e.is_empty());
    }

    #[test]
    fn autocommit_and_blocks() {
        let mut t = TxTrack::default();
        assert!(!t.statement(Kind::MayWrite));
        assert!(t.end_implicit(), "autocommit write is stamped at its end");
        assert!(!t.end_implicit());
        assert!(!t.statement(Kind::Begin));
        assert!(!t.statement(Kind::Read));
        assert!(
            !t.statement(Kind::Commit { chain: false }),
            "read-only block"
        );
        t.statement(Kind::Begin);
        t.statement(Kind::MayWrite);
        assert!(!t.end_implicit(), "Sync inside a block ends nothing");
        assert!(t.statement(Kind::Commit { chain: true }));
        assert!(t.in_block, "AND CHAIN opens a new block");
        t.statement(Kind::MayWrite);
        assert!(!t.statement(Kind::Rollback { chain: false }));
        t.sync(TxStatus::Failed);
        t.statement(Kind::MayWrite);
        assert!(!t.statement(Kind::Commit { chain: false }), "failed block");
    }

    #[test]
    fn injected_answers_are_swallowed() {
        let mut q = Expectations::default();
        q.push(Awaiting::Parse, false);
        q.push(Awaiting::Bind, false);
        q.push(Awaiting::Execute, false);
        for w in [
            Awaiting::Parse,
            Awaiting::Bind,
            Awaiting::Execute,
            Awaiting::Close,
        ] {
            q.push(w, true);
        }
        q.push(Awaiting::Sync, false);
        let seq = [
            (b'1', false),
            (b'2', false),
            (b'D', false),
            (b'C', false),
            (b'1', true),
            (b'2', true),
            (b'N', false),
            (b'D', true),
            (b'C', true),
            (b'3', true),
            (b'Z', false),
        ];
        for (tag, swallow) in seq {
            assert_eq!(q.on_server(tag).swallow, swallow, "tag {}", tag as char);
        }
        assert!(q.is_empty());
    }

    #[test]
    fn error_skips_to_sync() {
        let mut q = Expectations::default();
        for w in [Awaiting::Bind, Awaiting::Execute] {
            q.push(w, false);
        }
        for w in [
            Awaiting::Parse,
            Awaiting::Bind,
            Awaiting::Execute,
            Awaiting::Close,
        ] {
            q.push(w, true);
        }
        q.push(Awaiting::Sync, false);
        assert!(!q.on_server(b'E').swallow);
        assert_eq!(q.front().map(|e| e.what), Some(Awaiting::Sync));
        let v = q.on_server(b'Z');
        assert!(!v.swallow && v.settled);
    }
}
