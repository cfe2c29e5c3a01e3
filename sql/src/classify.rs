//! Statement classification for stamping.
//!
//! The proxy asks one question per statement: could it write, and does it start or
//! end a transaction? The answer only decides whether to stamp; capture never
//! depends on it, so when in doubt a statement is `MayWrite`. Statements that
//! PostgreSQL refuses inside a transaction block are `NoTxBlock`, because the stamp
//! would put them in one. This module never rejects or rewrites SQL.

use crate::lexer::{split_statements, Lexer, Token};

/// What a statement means for stamping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Cannot write replicated data (SELECT without volatile calls, SHOW, EXPLAIN ...).
    Read,
    /// May write replicated data.
    MayWrite,
    /// `BEGIN` / `START TRANSACTION`.
    Begin,
    /// `COMMIT` / `END`, with `AND CHAIN` when `chain`.
    Commit { chain: bool },
    /// `ROLLBACK` / `ABORT` (not `ROLLBACK TO SAVEPOINT`).
    Rollback { chain: bool },
    /// `PREPARE TRANSACTION`: ends the transaction like a commit does.
    PrepareTransaction,
    /// `SET [LOCAL] pgmesh.replicate = on|off`; `local` for `SET LOCAL`.
    SetReplicate { on: bool, local: bool },
    /// Must not run inside a transaction block (VACUUM, CREATE DATABASE, ...).
    NoTxBlock,
    /// Neutral: savepoints, SET, LISTEN, prepared-statement management ...
    Neutral,
}

impl Kind {
    /// Whether the statement may change replicated data.
    pub fn may_write(self) -> bool {
        matches!(self, Kind::MayWrite)
    }
}

/// Functions known not to write, so a SELECT calling them stays `Read`.
const READ_ONLY_FUNCTIONS: &[&str] = &[
    "abs",
    "array_agg",
    "array_length",
    "avg",
    "bool_and",
    "bool_or",
    "ceil",
    "coalesce",
    "concat",
    "count",
    "current_database",
    "current_schema",
    "current_setting",
    "current_user",
    "date_trunc",
    "extract",
    "floor",
    "format",
    "generate_series",
    "greatest",
    "jsonb_agg",
    "jsonb_build_object",
    "json_agg",
    "least",
    "length",
    "lower",
    "max",
    "min",
    "now",
    "nullif",
    "pg_backend_pid",
    "pg_sleep",
    "random",
    "round",
    "string_agg",
    "substr",
    "substring",
    "sum",
    "to_char",
    "trim",
    "upper",
    "version",
    "clock_timestamp",
    "statement_timestamp",
    "pg_is_in_recovery",
    "exists",
    "any",
    "all",
    "cast",
    "in",
    "not",
    "and",
    "or",
    "values",
    "row",
    "array",
    "select",
    "from",
    "where",
    "over",
    "filter",
    "within",
    "lateral",
    "join",
    "on",
    "using",
    "as",
    "is",
];

/// Words that may stand right before `(` without being a function call.
fn is_call(word: &str) -> bool {
    !READ_ONLY_FUNCTIONS
        .iter()
        .any(|f| f.eq_ignore_ascii_case(word))
}

/// Classifies one statement (no top-level semicolons).
pub fn classify(stmt: &str) -> Kind {
    let mut toks = Lexer::new(stmt).peekable();
    let Some(first) = toks.next() else {
        return Kind::Neutral;
    };
    let first = match first {
        Token::Word(w) => w.to_ascii_lowercase(),
        // `(SELECT ...)`, `VALUES`, or garbage: be careful.
        Token::LParen => return classify_query(stmt),
        _ => return Kind::MayWrite,
    };
    let rest: Vec<Token<'_>> = toks.collect();
    let word = |i: usize| match rest.get(i) {
        Some(Token::Word(w)) => w.to_ascii_lowercase(),
        _ => String::new(),
    };
    let has_chain = || {
        rest.windows(2).any(|w| {
            matches!(w, [Token::Word(a), Token::Word(b)]
                if a.eq_ignore_ascii_case("and") && b.eq_ignore_ascii_case("chain"))
        }) && !rest.windows(3).any(|w| {
            matches!(w, [Token::Word(a), Token::Word(n), Token::Word(_)]
                if a.eq_ignore_ascii_case("and") && n.eq_ignore_ascii_case("no"))
        })
    };
    match first.as_str() {
        "select" | "with" | "values" | "table" => classify_query(stmt),
        "insert" | "update" | "delete" | "merge" | "truncate" | "call" | "do" => Kind::MayWrite,
        "copy" => {
            if rest
                .iter()
                .any(|t| matches!(t, Token::Word(w) if w.eq_ignore_ascii_case("from")))
            {
                Kind::MayWrite
            } else {
                Kind::Read
            }
        }
        "begin" | "start" => Kind::Begin,
        "commit" | "end" => match word(0).as_str() {
            "prepared" => Kind::NoTxBlock,
            _ => Kind::Commit { chain: has_chain() },
        },
        "abort" => Kind::Rollback { chain: has_chain() },
        "rollback" => match word(0).as_str() {
            "to" => Kind::Neutral,
            "prepared" => Kind::NoTxBlock,
            _ => Kind::Rollback { chain: has_chain() },
        },
        "prepare" if word(0) == "transaction" => Kind::PrepareTransaction,
        "savepoint" | "release" | "show" | "listen" | "unlisten" | "notify" | "deallocate"
        | "prepare" | "close" | "fetch" | "move" | "declare" | "discard" | "reset" | "lock"
        | "load" | "checkpoint" | "explain" | "analyze" | "analyse" => Kind::Neutral,
        "set" => classify_set(&rest),
        "vacuum" | "cluster" | "reindex" if concurrently_or_bare(&first, &rest) => Kind::NoTxBlock,
        "create" | "drop" | "alter" => {
            let w0 = word(0);
            let w1 = word(1);
            let no_block = matches!(
                w0.as_str(),
                "database" | "tablespace" | "system" | "subscription"
            ) || (w0 == "index" || (w0 == "unique" && w1 == "index"))
                && rest
                    .iter()
                    .any(|t| matches!(t, Token::Word(w) if w.eq_ignore_ascii_case("concurrently")))
                || (w0 == "type"
                    && rest
                        .iter()
                        .any(|t| matches!(t, Token::Word(w) if w.eq_ignore_ascii_case("value"))));
            if no_block {
                Kind::NoTxBlock
            } else {
                Kind::MayWrite
            }
        }
        "execute" => Kind::MayWrite,
        _ => Kind::MayWrite,
    }
}

fn concurrently_or_bare(first: &str, rest: &[Token<'_>]) -> bool {
    match first {
        "vacuum" => true,
        "cluster" => rest.is_empty(),
        _ => rest
            .iter()
            .any(|t| matches!(t, Token::Word(w) if w.eq_ignore_ascii_case("concurrently") || w.eq_ignore_ascii_case("system") || w.eq_ignore_ascii_case("database"))),
    }
}

fn classify_set(rest: &[Token<'_>]) -> Kind {
    let mut i = 0;
    let local = matches!(rest.first(), Some(Token::Word(w)) if w.eq_ignore_ascii_case("local"));
    if local || matches!(rest.first(), Some(Token::Word(w)) if w.eq_ignore_ascii_case("session")) {
        i = 1;
    }
    let is_name = matches!(
        (rest.get(i), rest.get(i + 1), rest.get(i + 2)),
        (Some(Token::Word(a)), Some(Token::Other(".")), Some(Token::Word(b)))
            if a.eq_ignore_ascii_case("pgmesh") && b.eq_ignore_ascii_case("replicate")
    );
    if !is_name {
        return Kind::Neutral;
    }
    let value = rest[i + 3..].iter().find_map(|t| match t {
        Token::Word(w) if w.eq_ignore_ascii_case("to") => None,
        Token::Word(w) => Some(w.to_ascii_lowercase()),
        Token::Literal(l) => Some(l.trim_matches('\'').to_ascii_lowercase()),
        _ => None,
    });
    match value.as_deref() {
        Some("off" | "false" | "no" | "0") => Kind::SetReplicate { on: false, local },
        Some("on" | "true" | "yes" | "1" | "default") => Kind::SetReplicate { on: true, local },
        _ => Kind::Neutral,
    }
}

/// A query that starts like a read: it writes only through a writable CTE, `INTO`,
/// row locks on nothing, or a call to a function not known to be read-only.
fn classify_query(stmt: &str) -> Kind {
    let toks: Vec<Token<'_>> = Lexer::new(stmt).collect();
    for (i, t) in toks.iter().enumerate() {
        if let Token::Word(w) = t {
            let lw = w.to_ascii_lowercase();
            if matches!(
                lw.as_str(),
                "insert" | "update" | "delete" | "merge" | "into"
            ) {
                // `FOR UPDATE` is a lock, not a write.
                let prev_for = i > 0
                    && matches!(toks[i - 1], Token::Word(p) if p.eq_ignore_ascii_case("for") || p.eq_ignore_ascii_case("no") || p.eq_ignore_ascii_case("key"));
                if !(lw == "update" && prev_for) {
                    return Kind::MayWrite;
                }
            }
            if matches!(toks.get(i + 1), Some(Token::LParen)) && is_call(&lw) {
                return Kind::MayWrite;
            }
        }
    }
    Kind::Read
}

/// Whether a statement is `COPY ... FROM STDIN`, which puts the session in copy-in
/// mode (where the server ignores Sync and Flush until CopyDone or CopyFail).
pub fn is_copy_from_stdin(stmt: &str) -> bool {
    let mut words = Lexer::new(stmt).filter_map(|t| match t {
        Token::Word(w) => Some(w),
        _ => None,
    });
    if !words.next().is_some_and(|w| w.eq_ignore_ascii_case("copy")) {
        return false;
    }
    let mut prev_from = false;
    for w in words {
        if prev_from && w.eq_ignore_ascii_case("stdin") {
            return true;
        }
        prev_from = w.eq_ignore_ascii_case("from");
    }
    false
}

/// Classifies every statement of a (possibly multi-statement) query string.
pub fn classify_all(sql: &str) -> Vec<Kind> {
    split_statements(sql)
        .into_iter()
        .map(|r| classify(&sql[r]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_reads() {
        for s in [
            "INSERT INTO t VALUES (1)",
            "update t set a = 1",
            "DELETE FROM t",
            "with x as (delete from t returning *) select * from x",
            "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x",
            "select my_func(1)",
            "SELECT nextval('s')",
            "copy t from stdin",
            "merge into t using s on true when matched then delete",
            "create table t(a int)",
            "alter table t add column b int",
            "truncate t",
            "select * into new_t from t",
            "do $$ begin insert into t values (1); end $$",
            "call p()",
            "execute stmt(1)",
        ] {
            assert_eq!(classify(s), Kind::MayWrite, "{s}");
        }
        for s in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "select count(*) from t",
            "select * from t for update",
            "select * from t for no key update",
            "copy t to stdout",
            "values (1), (2)",
            "(select 1)",
            "select 'insert into t'",
            "select pg_sleep(1)",
        ] {
            assert_eq!(classify(s), Kind::Read, "{s}");
        }
    }

    #[test]
    fn transaction_control() {
        assert_eq!(classify("BEGIN"), Kind::Begin);
        assert_eq!(
            classify("start transaction isolation level serializable"),
            Kind::Begin
        );
        assert_eq!(classify("commit"), Kind::Commit { chain: false });
        assert_eq!(classify("END"), Kind::Commit { chain: false });
        assert_eq!(classify("COMMIT AND CHAIN"), Kind::Commit { chain: true });
        assert_eq!(
            classify("commit and no chain"),
            Kind::Commit { chain: false }
        );
        assert_eq!(classify("rollback"), Kind::Rollback { chain: false });
        assert_eq!(classify("abort and chain"), Kind::Rollback { chain: true });
        assert_eq!(classify("ROLLBACK TO SAVEPOINT a"), Kind::Neutral);
        assert_eq!(classify("savepoint a"), Kind::Neutral);
        assert_eq!(classify("release savepoint a"), Kind::Neutral);
        assert_eq!(
            classify("prepare transaction 'x'"),
            Kind::PrepareTransaction
        );
        assert_eq!(classify("commit prepared 'x'"), Kind::NoTxBlock);
    }

    #[test]
    fn no_transaction_block() {
        for s in [
            "vacuum",
            "VACUUM ANALYZE t",
            "create database d",
            "drop database d",
            "create index concurrently i on t(a)",
            "reindex table concurrently t",
            "alter system set work_mem = '4MB'",
            "cluster",
            "alter type e add value 'x'",
        ] {
            assert_eq!(classify(s), Kind::NoTxBlock, "{s}");
        }
        assert_eq!(classify("create index i on t(a)"), Kind::MayWrite);
    }

    #[test]
    fn replicate_setting() {
        let set = |on, local| Kind::SetReplicate { on, local };
        assert_eq!(classify("SET pgmesh.replicate = off"), set(false, false));
        assert_eq!(
            classify("set local pgmesh.replicate to 'off'"),
            set(false, true)
        );
        assert_eq!(classify("SET pgmesh.replicate = on"), set(true, false));
        assert_eq!(classify("SET pgmesh.replicate = 'on'"), set(true, false));
        assert_eq!(classify("set work_mem = '4MB'"), Kind::Neutral);
    }

    #[test]
    fn copy_in_detection() {
        assert!(is_copy_from_stdin(
            "COPY t (a, b) FROM STDIN WITH (FORMAT csv)"
        ));
        assert!(is_copy_from_stdin("copy t from stdin"));
        assert!(!is_copy_from_stdin("copy t from '/tmp/x'"));
        assert!(!is_copy_from_stdin("copy t to stdout"));
        assert!(!is_copy_from_stdin("select 'copy t from stdin'"));
    }

    #[test]
    fn multi_statement() {
        assert_eq!(
            classify_all("begin; insert into t values (1); commit"),
            [Kind::Begin, Kind::MayWrite, Kind::Commit { chain: false }]
        );
    }
}
