//! Message framing of the PostgreSQL v3 protocol: `tag:u8, len:i32, body`.
//!
//! This file owns splitting complete frames off a receive buffer, writing framed
//! messages with their length patched in, and the small bounds-checked reader the
//! message decoders use. Like mini-redis' `frame.rs`, it checks that a frame is
//! complete before anything parses it, so "need more bytes" (`Ok(None)`) and "these
//! bytes are garbage" (`Err`) never get confused. It must never do IO and never
//! look inside a frame's body: that is the job of [`super::backend`] and
//! [`super::frontend`].

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::ReplError;

/// Tag byte plus the four length bytes.
pub const HEADER_LEN: usize = 5;
/// PostgreSQL lengths are int32, and the length counts itself.
const MAX_LEN: usize = i32::MAX as usize;

/// One complete message: its tag and its body (without tag or length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

impl Frame {
    /// Splits one complete frame off the front of `buf`.
    ///
    /// Returns `Ok(None)`, leaving `buf` untouched, when it does not yet hold a
    /// whole frame; it then reserves room for the rest of that frame so the next
    /// read can fill it without reallocating piecemeal. The body shares `buf`'s
    /// allocation (no copy).
    pub fn parse(buf: &mut BytesMut) -> Result<Option<Frame>, ReplError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let tag = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if !(4..=MAX_LEN).contains(&len) {
            return Err(ReplError::Malformed {
                tag,
                reason: "length field out of range",
            });
        }
        let total = 1 + len;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut frame = buf.split_to(total);
        frame.advance(HEADER_LEN);
        Ok(Some(Frame {
            tag,
            body: frame.freeze(),
        }))
    }

    /// Appends the wire form to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), ReplError> {
        write_frame(dst, Some(self.tag), |d| d.put_slice(&self.body))
    }
}

/// Appends a frame to `dst`: the tag (none for the startup message), a length
/// placeholder, whatever `body` writes, then the real length.
pub fn write_frame(
    dst: &mut BytesMut,
    tag: Option<u8>,
    body: impl FnOnce(&mut BytesMut),
) -> Result<(), ReplError> {
    let start = dst.len();
    if let Some(tag) = tag {
        dst.put_u8(tag);
    }
    let len_at = dst.len();
    dst.put_i32(0);
    body(dst);
    let len = dst.len() - len_at;
    match i32::try_from(len) {
        Ok(len) => {
            dst[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Err(_) => {
            dst.truncate(start);
            Err(ReplError::InvalidArgument(format!(
                "message of {len} bytes exceeds the protocol limit"
            )))
        }
    }
}

/// Writes `s` NUL-terminated, refusing interior NULs (they would end the string
/// early on the server and shift every following field).
pub fn put_cstr(dst: &mut BytesMut, what: &str, s: &str) -> Result<(), ReplError> {
    if s.as_bytes().contains(&0) {
        return Err(ReplError::InvalidArgument(format!(
            "{what} contains a NUL byte"
        )));
    }
    dst.put_slice(s.as_bytes());
    dst.put_u8(0);
    Ok(())
}

/// A bounds-checked reader over one frame body. Every error names the frame's tag.
#[derive(Debug)]
pub struct Body {
    tag: u8,
    buf: Bytes,
}

impl Body {
    pub fn new(frame: Frame) -> Self {
        Body {
            tag: frame.tag,
            buf: frame.body,
        }
    }

    fn need(&self, n: usize) -> Result<(), ReplError> {
        if self.buf.len() < n {
            Err(ReplError::Malformed {
                tag: self.tag,
                reason: "body shorter than its fields",
            })
        } else {
            Ok(())
        }
    }

    pub fn u8(&mut self) -> Result<u8, ReplError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    pub fn i16(&mut self) -> Result<i16, ReplError> {
        self.need(2)?;
        Ok(self.buf.get_i16())
    }

    pub fn i32(&mut self) -> Result<i32, ReplError> {
        self.need(4)?;
        Ok(self.buf.get_i32())
    }

    pub fn u32(&mut self) -> Result<u32, ReplError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    /// A count field: a non-negative int16.
    pub fn count(&mut self) -> Result<usize, ReplError> {
        usize::try_from(self.i16()?).map_err(|_| ReplError::Malformed {
            tag: self.tag,
            reason: "negative count",
        })
    }

    /// `n` raw bytes, sharing the frame's allocation.
    pub fn bytes(&mut self, n: usize) -> Result<Bytes, ReplError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }

    /// A NUL-terminated string. Server text is UTF-8 because we ask for
    /// `client_encoding=UTF8`; the few messages sent before that takes effect (an
    /// early FATAL) are decoded lossily rather than rejected.
    pub fn cstr(&mut self) -> Result<String, ReplError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(ReplError::Malformed {
                tag: self.tag,
                reason: "string without NUL terminator",
            })?;
        let s = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.advance(end + 1);
        Ok(s)
    }

    /// Everything left.
    pub fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Fails if bytes are left: a length mismatch means we misread the message.
    pub fn finish(&self) -> Result<(), ReplError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ReplError::Malformed {
                tag: self.tag,
                reason: "trailing bytes after the last field",
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Frame {
        Frame {
            tag,
            body: Bytes::copy_from_slice(body),
        }
    }

    #[test]
    fn round_trips() {
        let f = frame(b'd', b"hello");
        let mut buf = BytesMut::new();
        f.encode(&mut buf).unwrap();
        assert_eq!(&buf[..], b"d\x00\x00\x00\x09hello");
        assert_eq!(Frame::parse(&mut buf).unwrap(), Some(f));
        assert!(buf.is_empty());
    }

    #[test]
    fn incomplete_frames_leave_the_buffer_alone() {
        let mut wire = BytesMut::new();
        frame(b'd', &[7; 100]).encode(&mut wire).unwrap();
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            assert_eq!(Frame::parse(&mut buf).unwrap(), None, "cut at {cut}");
            assert_eq!(&buf[..], &wire[..cut]);
            if cut >= HEADER_LEN {
                assert!(buf.capacity() >= wire.len(), "reserved the rest");
            }
        }
    }

    #[test]
    fn splits_back_to_back_frames_and_keeps_the_tail() {
        let mut buf = BytesMut::new();
        frame(b'Z', b"I").encode(&mut buf).unwrap();
        frame(b'c', b"").encode(&mut buf).unwrap();
        buf.put_slice(b"d\x00\x00");
        assert_eq!(Frame::parse(&mut buf).unwrap(), Some(frame(b'Z', b"I")));
        assert_eq!(Frame::parse(&mut buf).unwrap(), Some(frame(b'c', b"")));
        assert_eq!(Frame::parse(&mut buf).unwrap(), None);
        assert_eq!(&buf[..], b"d\x00\x00");
    }

    #[test]
    fn rejects_impossible_lengths() {
        for len in [0u32, 3, 0x8000_0000, u32::MAX] {
            let mut buf = BytesMut::new();
            buf.put_u8(b'D');
            buf.put_u32(len);
            let err = Frame::parse(&mut buf).unwrap_err();
            assert!(
                matches!(err, ReplError::Malformed { tag: b'D', .. }),
                "{len}"
            );
        }
    }

    #[test]
    fn startup_frames_have_no_tag() {
        let mut buf = BytesMut::new();
        write_frame(&mut buf, None, |d| d.put_i32(196_608)).unwrap();
        assert_eq!(&buf[..], &[0, 0, 0, 8, 0, 3, 0, 0]);
    }

    #[test]
    fn cstr_refuses_nul_and_reads_back() {
        let mut buf = BytesMut::new();
        assert!(put_cstr(&mut buf, "query", "a\0b").is_err());
        put_cstr(&mut buf, "query", "héllo").unwrap();
        let mut body = Body::new(frame(b'Q', &buf));
        assert_eq!(body.cstr().unwrap(), "héllo");
        body.finish().unwrap();
    }

    #[test]
    fn body_reader_reports_short_and_trailing() {
        let mut body = Body::new(frame(b'K', &[0, 0, 0, 1, 9]));
        assert_eq!(body.i32().unwrap(), 1);
        assert!(body.finish().is_err());
        assert!(body.i32().is_err());
        let mut body = Body::new(frame(b'S', b"no terminator"));
        assert!(body.cstr().is_err());
        let mut body = Body::new(frame(b'T', &[0xff, 0xff]));
        assert!(body.count().is_err());
    }
}
