//! Frame boundaries of the PostgreSQL v3 wire protocol.
//!
//! This module owns one question: "where does the next message start and end?".
//! It reads a tag byte and a big-endian length and nothing else, so the relay can
//! forward the original bytes untouched. It distinguishes a frame that is merely
//! *incomplete* (wait for more bytes) from one that is *invalid* (close with an
//! error). It must never allocate, copy or interpret message bodies.

use thiserror::Error;

/// Largest body PostgreSQL itself accepts for the "large" message types (1 GiB - 1).
pub const PG_LARGE_MESSAGE_LIMIT: usize = 0x3fff_ffff;
/// Largest body PostgreSQL accepts for the small, fixed-shape message types.
pub const PG_SMALL_MESSAGE_LIMIT: usize = 10_000;
/// Largest startup-phase packet PostgreSQL accepts (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// Errors that make a byte stream impossible to frame.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length field is below the 4 bytes it covers itself.
    #[error("invalid length {len} for message type {tag:?}")]
    BadLength { tag: char, len: i64 },
    /// The declared length is above the configured limit for this type.
    #[error("message type {tag:?} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { tag: char, len: usize, max: usize },
    /// A tag that is not a frontend message of protocol 3.
    #[error("invalid frontend message type {tag:?}")]
    UnknownTag { tag: char },
}

impl FrameError {
    /// SQLSTATE to report to the client for this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "54000",
            _ => "08P01",
        }
    }
}

/// Header of one tagged message: its tag and its total size including the tag byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Tag byte + length field + body.
    pub total: usize,
}

impl Header {
    /// Size of the body that follows the 5-byte header.
    pub fn body_len(&self) -> usize {
        self.total - 5
    }
}

/// Reads the header at the start of `buf`. `Ok(None)` means fewer than 5 bytes are
/// buffered. Checks the length against `max_body` but not the tag.
pub fn peek_header(buf: &[u8], max_body: usize) -> Result<Option<Header>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as i64;
    if len < 4 {
        return Err(FrameError::BadLength {
            tag: tag as char,
            len,
        });
    }
    let body = len as usize - 4;
    if body > max_body {
        return Err(FrameError::TooLarge {
            tag: tag as char,
            len: body,
            max: max_body,
        });
    }
    Ok(Some(Header {
        tag,
        total: len as usize + 1,
    }))
}

/// Whether `tag` is a message a protocol-3 client may send after startup.
pub fn is_frontend_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'B' | b'C'
            | b'd'
            | b'c'
            | b'f'
            | b'D'
            | b'E'
            | b'H'
            | b'F'
            | b'P'
            | b'p'
            | b'Q'
            | b'S'
            | b'X'
    )
}

/// Body limit PostgreSQL applies to a frontend message type; `large` is the
/// configured cap for the types that may carry user data.
pub fn frontend_body_limit(tag: u8, large: usize) -> usize {
    match tag {
        // Messages that carry queries, parameters, COPY data or auth payloads.
        b'Q' | b'P' | b'B' | b'd' | b'F' | b'p' | b'f' => large,
        _ => PG_SMALL_MESSAGE_LIMIT,
    }
}

/// Reads the length of an untagged startup-phase packet (StartupMessage, SSLRequest,
/// GSSENCRequest, CancelRequest). `Ok(None)` means fewer than 4 bytes are buffered.
pub fn peek_startup_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as i64;
    if len < 8 {
        return Err(FrameError::BadLength { tag: '\0', len });
    }
    if len as usize > MAX_STARTUP_PACKET {
        return Err(FrameError::TooLarge {
            tag: '\0',
            len: len as usize,
            max: MAX_STARTUP_PACKET,
        });
    }
    Ok(Some(len as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn incomplete_is_not_invalid() {
        assert_eq!(peek_header(b"Q\0\0", 100), Ok(None));
        let h = peek_header(&frame(b'Q', b"select 1\0"), 100)
            .unwrap()
            .unwrap();
        assert_eq!(h.tag, b'Q');
        assert_eq!(h.total, 1 + 4 + 9);
    }

    #[test]
    fn invalid_lengths() {
        let bad = [b'Q', 0, 0, 0, 3];
        assert!(matches!(
            peek_header(&bad, 100),
            Err(FrameError::BadLength { .. })
        ));
        let neg = [b'Q', 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            peek_header(&neg, 100),
            Err(FrameError::BadLength { .. })
        ));
        let big = frame(b'Q', &[b'x'; 101]);
        assert_eq!(
            peek_header(&big, 100).unwrap_err().sqlstate(),
            "54000",
            "oversized frames are a program limit"
        );
    }

    #[test]
    fn startup_lengths() {
        assert_eq!(peek_startup_len(&[0, 0]), Ok(None));
        assert!(peek_startup_len(&[0, 0, 0, 7]).is_err());
        assert!(peek_startup_len(&[0, 1, 0, 0]).is_err());
        assert_eq!(peek_startup_len(&[0, 0, 0, 8]), Ok(Some(8)));
    }

    proptest! {
        /// Any byte string either frames into complete messages, stops at an incomplete
        /// tail, or fails with an error; it never panics, and concatenated frames are
        /// recovered exactly.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut rest: &[u8] = &data;
            while let Ok(Some(h)) = peek_header(rest, PG_LARGE_MESSAGE_LIMIT) {
                if h.total > rest.len() { break; }
                rest = &rest[h.total..];
            }
            let _ = peek_startup_len(&data);
        }

        #[test]
        fn frames_round_trip(msgs in proptest::collection::vec(
            (prop::sample::select(b"BCdcfDEHFPpQSX".to_vec()), proptest::collection::vec(any::<u8>(), 0..40)), 0..10)) {
            let mut stream = Vec::new();
            for (tag, body) in &msgs { stream.extend(frame(*tag, body)); }
            let mut rest: &[u8] = &stream;
            let mut got = Vec::new();
            while let Some(h) = peek_header(rest, PG_LARGE_MESSAGE_LIMIT).unwrap() {
                prop_assert!(is_frontend_tag(h.tag));
                got.push((h.tag, rest[5..h.total].to_vec()));
                rest = &rest[h.total..];
            }
            prop_assert!(rest.is_empty());
            prop_assert_eq!(got, msgs);
        }
    }
}
