//! A small PostgreSQL lexer: enough to split a query string into statements and to
//! read the keywords a classifier needs.
//!
//! It understands single-quoted strings (including `E''` escapes), quoted
//! identifiers, dollar quotes, line and nested block comments, and parentheses. It
//! never fails: text it cannot make sense of is returned as `Other` tokens, because
//! a classifier must degrade to "may write", never to an error.

/// One token, borrowing from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token<'a> {
    /// An unquoted word, as written (compare case-insensitively).
    Word(&'a str),
    /// A quoted identifier, without the quotes.
    QuotedIdent(&'a str),
    /// A string or dollar-quoted literal, as written (with its quotes).
    Literal(&'a str),
    LParen,
    RParen,
    Semicolon,
    /// `=`, `,`, `.`, operators, numbers: anything else.
    Other(&'a str),
}

/// Iterator over tokens of a SQL string, skipping whitespace and comments.
#[derive(Debug, Clone)]
pub struct Lexer<'a> {
    src: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    pub fn new(src: &'a str) -> Self {
        Self { src, pos: 0 }
    }

    /// Byte offset of the next unread character.
    pub fn offset(&self) -> usize {
        self.pos
    }

    fn bytes(&self) -> &'a [u8] {
        self.src.as_bytes()
    }

    fn skip_trivia(&mut self) {
        let b = self.bytes();
        loop {
            while self.pos < b.len() && b[self.pos].is_ascii_whitespace() {
                self.pos += 1;
            }
            if b[self.pos..].starts_with(b"--") {
                while self.pos < b.len() && b[self.pos] != b'\n' {
                    self.pos += 1;
                }
            } else if b[self.pos..].starts_with(b"/*") {
                let mut depth = 0usize;
                while self.pos < b.len() {
                    if b[self.pos..].starts_with(b"/*") {
                        depth += 1;
                        self.pos += 2;
                    } else if b[self.pos..].starts_with(b"*/") {
                        depth -= 1;
                        self.pos += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        self.pos += 1;
                    }
                }
            } else {
                return;
            }
        }
    }

    /// Skips a quoted run that starts at `self.pos` (on the opening quote).
    fn skip_quoted(&mut self, quote: u8, backslash_escapes: bool) {
        let b = self.bytes();
        self.pos += 1;
        while self.pos < b.len() {
            let c = b[self.pos];
            if backslash_escapes && c == b'\\' {
                self.pos += 2;
                continue;
            }
            self.pos += 1;
            if c == quote {
                if self.pos < b.len() && b[self.pos] == quote {
                    self.pos += 1;
                    continue;
                }
                return;
            }
        }
        self.pos = self.pos.min(b.len());
    }

    /// At `$`: a dollar-quote tag like `$$` or `$fn$`, if one starts here.
    fn dollar_tag(&self) -> Option<usize> {
        let b = self.bytes();
        let mut i = self.pos + 1;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80) {
            if i == self.pos + 1 && b[i].is_ascii_digit() {
                return None; // `$1` is a parameter
            }
            i += 1;
        }
        (i < b.len() && b[i] == b'$').then_some(i + 1 - self.pos)
    }
}

fn is_word_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_word_char(c: u8) -> bool {
    is_word_start(c) || c.is_ascii_digit() || c == b'$'
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        self.skip_trivia();
        let b = self.bytes();
        let start = self.pos;
        let c = *b.get(start)?;
        let tok = match c {
            b'\'' => {
                self.skip_quoted(b'\'', false);
                Token::Literal(&self.src[start..self.pos])
            }
            b'"' => {
                self.skip_quoted(b'"', false);
                let end = self.pos.saturating_sub(1).max(start + 1);
                Token::QuotedIdent(self.src.get(start + 1..end).unwrap_or(""))
            }
            b'(' => {
                self.pos += 1;
                Token::LParen
            }
            b')' => {
                self.pos += 1;
                Token::RParen
            }
            b';' => {
                self.pos += 1;
                Token::Semicolon
            }
            b'$' => match self.dollar_tag() {
                Some(n) => {
                    let tag = &b[start..start + n];
                    let body = start + n;
                    let end = b[body..]
                        .windows(n)
                        .position(|w| w == tag)
                        .map_or(b.len(), |p| body + p + n);
                    self.pos = end;
                    Token::Literal(&self.src[start..self.pos])
                }
                None => {
                    self.pos += 1;
                    while self.pos < b.len() && b[self.pos].is_ascii_digit() {
                        self.pos += 1;
                    }
                    Token::Other(&self.src[start..self.pos])
                }
            },
            c if (c == b'E' || c == b'e') && b.get(start + 1) == Some(&b'\'') => {
                self.pos += 1;
                self.skip_quoted(b'\'', true);
                Token::Literal(&self.src[start..self.pos.min(b.len())])
            }
            c if is_word_start(c) => {
                while self.pos < b.len() && is_word_char(b[self.pos]) {
                    self.pos += 1;
                }
                Token::Word(&self.src[start..self.pos])
            }
            _ => {
                // Step over one UTF-8 character.
                self.pos += 1;
                while self.pos < b.len() && !self.src.is_char_boundary(self.pos) {
                    self.pos += 1;
                }
                Token::Other(&self.src[start..self.pos])
            }
        };
        Some(tok)
    }
}

/// Splits a query string at top-level semicolons. Empty statements are dropped.
/// Returns byte ranges into `sql`, without the semicolons.
pub fn split_statements(sql: &str) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut lx = Lexer::new(sql);
    let mut start = 0usize;
    let mut nonempty = false;
    let mut depth = 0i32;
    loop {
        let before = lx.offset();
        match lx.next() {
            None => break,
            Some(Token::Semicolon) if depth <= 0 => {
                if nonempty {
                    out.push(start..before);
                }
                start = lx.offset();
                nonempty = false;
                depth = 0;
            }
            Some(t) => {
                nonempty = true;
                match t {
                    Token::LParen => depth += 1,
                    Token::RParen => depth -= 1,
                    _ => {}
                }
            }
        }
    }
    if nonempty {
        out.push(start..sql.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        Lexer::new(s)
            .filter_map(|t| match t {
                Token::Word(w) => Some(w.to_ascii_lowercase()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn skips_comments_and_literals() {
        assert_eq!(
            words("/* a /* nested */ insert */ SELECT 'delete; x' -- update\n FROM t"),
            ["select", "from", "t"]
        );
        assert_eq!(words("select $$ insert $$, $f$ ; $f$, $1"), ["select"]);
        assert_eq!(words(r"select E'it\'s; delete'"), ["select"]);
        assert_eq!(
            words("select \"Weird;Name\" from x"),
            ["select", "from", "x"]
        );
    }

    #[test]
    fn splits_at_top_level_semicolons() {
        let sql =
            "insert into t values (';'); ; select 1;create function f() as $$ a; b $$ language sql";
        let parts: Vec<&str> = split_statements(sql)
            .into_iter()
            .map(|r| sql[r].trim())
            .collect();
        assert_eq!(
            parts,
            [
                "insert into t values (';')",
                "select 1",
                "create function f() as $$ a; b $$ language sql"
            ]
        );
        assert!(split_statements("  ;; -- nothing\n").is_empty());
    }

    #[test]
    fn unterminated_input_does_not_panic() {
        for s in ["'abc", "\"abc", "$$abc", "/* abc", "E'\\", "$", "é;ü"] {
            let _ = split_statements(s);
            let _: Vec<_> = Lexer::new(s).collect();
        }
    }
}
