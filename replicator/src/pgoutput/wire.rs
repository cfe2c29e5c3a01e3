//! Bounds-checked big-endian primitives shared by the decoders and encoders.
//!
//! This file owns the only code that indexes into message bytes. Every read checks
//! the remaining length first and reports [`PgOutputError::Truncated`], so the
//! decoders above it never panic. It must never allocate based on an untrusted count
//! without first bounding it by the bytes actually present.

use bytes::{BufMut, Bytes, BytesMut};

use super::PgOutputError;

/// A cursor over one message. Slices share the input's allocation (zero copy).
pub(crate) struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn ensure(&self, n: usize) -> Result<(), PgOutputError> {
        if self.remaining() < n {
            return Err(PgOutputError::Truncated {
                need: self.pos.saturating_add(n),
                have: self.buf.len(),
            });
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PgOutputError> {
        self.ensure(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.pos..self.pos + N]);
        self.pos += N;
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, PgOutputError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, PgOutputError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, PgOutputError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, PgOutputError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, PgOutputError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, PgOutputError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    /// `n` raw bytes, sharing the input buffer.
    pub(crate) fn bytes(&mut self, n: usize) -> Result<Bytes, PgOutputError> {
        self.ensure(n)?;
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    /// An Int32 length followed by that many bytes. Negative lengths are invalid:
    /// pgoutput marks NULL with a column kind, never with length -1.
    pub(crate) fn len_prefixed(&mut self) -> Result<Bytes, PgOutputError> {
        let len = self.i32()?;
        let len = usize::try_from(len).map_err(|_| PgOutputError::NegativeLength(len))?;
        self.bytes(len)
    }

    /// Everything left in the message.
    pub(crate) fn rest(&mut self) -> Bytes {
        let out = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        out
    }

    /// A NUL-terminated string. A missing NUL means the buffer ended inside the
    /// string, which is truncation, not invalidity.
    pub(crate) fn cstr(&mut self) -> Result<String, PgOutputError> {
        let rest = &self.buf[self.pos..];
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(PgOutputError::Truncated {
                need: self.buf.len().saturating_add(1),
                have: self.buf.len(),
            });
        };
        let s = std::str::from_utf8(&rest[..nul])
            .map_err(|_| PgOutputError::InvalidUtf8)?
            .to_owned();
        self.pos += nul + 1;
        Ok(s)
    }

    /// Fails unless every byte has been consumed.
    pub(crate) fn finish(&self) -> Result<(), PgOutputError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(PgOutputError::TrailingBytes(n)),
        }
    }
}

/// Writes `s` NUL-terminated.
pub(crate) fn put_cstr(
    dst: &mut BytesMut,
    s: &str,
    field: &'static str,
) -> Result<(), PgOutputError> {
    if s.as_bytes().contains(&0) {
        return Err(PgOutputError::InteriorNul { field });
    }
    dst.put_slice(s.as_bytes());
    dst.put_u8(0);
    Ok(())
}

/// Writes an Int32 length and then `data`.
pub(crate) fn put_len_prefixed(
    dst: &mut BytesMut,
    data: &[u8],
    field: &'static str,
) -> Result<(), PgOutputError> {
    let len = i32::try_from(data.len()).map_err(|_| PgOutputError::TooLarge {
        field,
        len: data.len(),
    })?;
    dst.put_i32(len);
    dst.put_slice(data);
    Ok(())
}

/// Converts a count to the width of its wire field.
pub(crate) fn count<T: TryFrom<usize>>(n: usize, field: &'static str) -> Result<T, PgOutputError> {
    T::try_from(n).map_err(|_| PgOutputError::TooLarge { field, len: n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_report_total_length_needed() {
        let mut r = Reader::new(Bytes::from_static(&[1, 2, 3]));
        assert_eq!(r.u8(), Ok(1));
        assert_eq!(r.u32(), Err(PgOutputError::Truncated { need: 5, have: 3 }));
        // A failed read consumes nothing.
        assert_eq!(r.u16(), Ok(0x0203));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn cstr_without_nul_is_truncated_and_bad_utf8_is_invalid() {
        let mut r = Reader::new(Bytes::from_static(b"abc"));
        assert!(r.cstr().unwrap_err().is_truncated());
        let mut r = Reader::new(Bytes::from_static(b"a\xffb\0"));
        assert_eq!(r.cstr(), Err(PgOutputError::InvalidUtf8));
        let mut r = Reader::new(Bytes::from_static(b"\0xy\0"));
        assert_eq!(r.cstr().as_deref(), Ok(""));
        assert_eq!(r.cstr().as_deref(), Ok("xy"));
    }

    #[test]
    fn huge_and_negative_lengths_do_not_allocate_or_panic() {
        let mut r = Reader::new(Bytes::from_static(&[0x7f, 0xff, 0xff, 0xff]));
        assert!(r.len_prefixed().unwrap_err().is_truncated());
        let mut r = Reader::new(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]));
        assert_eq!(r.len_prefixed(), Err(PgOutputError::NegativeLength(-1)));
    }

    #[test]
    fn encoders_refuse_what_the_wire_cannot_carry() {
        let mut dst = BytesMut::new();
        assert_eq!(
            put_cstr(&mut dst, "a\0b", "name"),
            Err(PgOutputError::InteriorNul { field: "name" })
        );
        assert_eq!(
            count::<u16>(70_000, "columns"),
            Err(PgOutputError::TooLarge {
                field: "columns",
                len: 70_000
            })
        );
    }
}
