//! The socket of a replication connection and its two buffers.
//!
//! This file owns the only IO in the module: reading whole backend messages
//! through a [`BytesMut`] receive buffer and writing queued frontend messages
//! from a send buffer. Both directions survive cancellation: [`Transport::recv`]
//! keeps partial frames in the buffer between calls, and [`Transport::flush`]
//! keeps an unsent tail that goes out ahead of the next write, so a `select!`
//! that drops either future never desynchronises the stream. It must never
//! interpret messages beyond decoding them, and never log their contents.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::backend::BackendMessage;
use super::frame::Frame;
use super::frontend::FrontendMessage;
use super::ReplError;
use crate::pgtls::PgStream;

/// Bytes we ask the kernel for per read when no larger frame is pending.
const READ_CHUNK: usize = 64 * 1024;

/// A connection to PostgreSQL (TCP, or TLS over it) with framed, cancel-safe reads
/// and resumable writes.
#[derive(Debug)]
pub struct Transport {
    stream: PgStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Transport {
    pub fn new(stream: PgStream) -> Self {
        Transport {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(1024),
        }
    }

    /// Whether a complete frame is already buffered, so `recv` will not wait.
    pub fn has_complete_frame(&self) -> bool {
        self.rbuf.len() >= 5
            && (u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]])
                as usize)
                < self.rbuf.len()
    }

    /// The next complete message from the server.
    ///
    /// Cancel-safe: the only await is `read_buf`, which either appends bytes to
    /// the receive buffer or does nothing, and a frame is taken out of the buffer
    /// only after it is complete, with no await between taking and returning it.
    pub async fn recv(&mut self) -> Result<BackendMessage, ReplError> {
        loop {
            if let Some(frame) = Frame::parse(&mut self.rbuf)? {
                return BackendMessage::decode(frame);
            }
            // Frame::parse reserved room for a known frame; otherwise make sure a
            // read can fetch a decent chunk, not a few bytes at a time.
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
                self.rbuf.reserve(READ_CHUNK);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(ReplError::Closed {
                    mid_frame: !self.rbuf.is_empty(),
                });
            }
        }
    }

    /// Appends `msg` to the send buffer without writing it.
    pub fn queue(&mut self, msg: &FrontendMessage) -> Result<(), ReplError> {
        msg.encode(&mut self.wbuf)
    }

    /// Writes out everything queued. If this future is dropped part-way, what was
    /// not yet written stays queued and goes out first on the next flush.
    pub async fn flush(&mut self) -> Result<(), ReplError> {
        // write_all_buf advances the buffer as bytes are written.
        self.stream.write_all_buf(&mut self.wbuf).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Queues `msg` and flushes.
    pub async fn send(&mut self, msg: &FrontendMessage) -> Result<(), ReplError> {
        self.queue(msg)?;
        self.flush().await
    }

    /// Bytes of a partial frame waiting in the receive buffer (for tests).
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.rbuf.len()
    }
}
