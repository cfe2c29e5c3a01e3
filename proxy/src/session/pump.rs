//! Byte pump between the client socket and the upstream socket of one session.
//!
//! One task owns both streams and polls reads and writes of both from a single
//! future, so neither direction can block the other (a pipelining client and a
//! server streaming results never deadlock on full socket buffers). Pending output is
//! bounded: a side is not read while the other side's queue is above a high-water
//! mark, which is the backpressure. It moves bytes; it never interprets them.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;

use crate::net::stream::Stream;

/// Stop reading a side while this many bytes wait to be written to the other side.
const HIGH_WATER: usize = 256 * 1024;
/// Minimum free space offered to each read.
const READ_CHUNK: usize = 16 * 1024;

/// Something that happened on one of the two sockets.
#[derive(Debug)]
pub enum Event {
    ClientData,
    ServerData,
    ClientEof,
    ServerEof,
    ClientError(io::Error),
    ServerError(io::Error),
}

/// Both sockets with their input and output queues.
#[derive(Debug)]
pub struct Pump {
    pub client: Stream,
    pub server: Stream,
    /// Bytes read from the client, not yet consumed by the relay.
    pub cin: BytesMut,
    /// Bytes read from the server, not yet consumed by the relay.
    pub sin: BytesMut,
    /// Bytes queued for the server.
    pub to_server: BytesMut,
    /// Bytes queued for the client.
    pub to_client: BytesMut,
    server_dirty: bool,
    client_dirty: bool,
}

impl Pump {
    pub fn new(client: Stream, server: Stream, cin: BytesMut) -> Self {
        Self {
            client,
            server,
            cin,
            sin: BytesMut::with_capacity(READ_CHUNK * 2),
            to_server: BytesMut::with_capacity(READ_CHUNK),
            to_client: BytesMut::with_capacity(READ_CHUNK * 2),
            server_dirty: false,
            client_dirty: false,
        }
    }

    /// Makes write progress on both sides and waits for the next read event.
    pub async fn next(&mut self) -> Event {
        poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if let Err(e) = drain(
            &mut self.server,
            &mut self.to_server,
            &mut self.server_dirty,
            cx,
        ) {
            return Poll::Ready(Event::ServerError(e));
        }
        if let Err(e) = drain(
            &mut self.client,
            &mut self.to_client,
            &mut self.client_dirty,
            cx,
        ) {
            return Poll::Ready(Event::ClientError(e));
        }
        if self.to_server.len() < HIGH_WATER {
            reserve(&mut self.cin);
            match poll_read_buf(Pin::new(&mut self.client), cx, &mut self.cin) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Event::ClientEof),
                Poll::Ready(Ok(_)) => return Poll::Ready(Event::ClientData),
                Poll::Ready(Err(e)) => return Poll::Ready(Event::ClientError(e)),
                Poll::Pending => {}
            }
        }
        if self.to_client.len() < HIGH_WATER {
            reserve(&mut self.sin);
            match poll_read_buf(Pin::new(&mut self.server), cx, &mut self.sin) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Event::ServerEof),
                Poll::Ready(Ok(_)) => return Poll::Ready(Event::ServerData),
                Poll::Ready(Err(e)) => return Poll::Ready(Event::ServerError(e)),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    /// Writes everything queued for the client and flushes.
    pub async fn flush_client(&mut self) -> io::Result<()> {
        write_all(&mut self.client, &mut self.to_client).await
    }

    /// Writes everything queued for the server and flushes.
    pub async fn flush_server(&mut self) -> io::Result<()> {
        write_all(&mut self.server, &mut self.to_server).await
    }

    /// Shuts both sockets down (TLS close_notify where applicable).
    pub async fn shutdown(&mut self) {
        let _ = self.client.shutdown().await;
        let _ = self.server.shutdown().await;
    }
}

async fn write_all(s: &mut Stream, buf: &mut BytesMut) -> io::Result<()> {
    s.write_all(buf).await?;
    buf.clear();
    s.flush().await
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK {
        buf.reserve(READ_CHUNK * 2);
    }
}

/// Writes as much of `buf` as the socket takes without blocking, then flushes once the
/// queue is empty (TLS buffers records until flushed).
fn drain(
    s: &mut Stream,
    buf: &mut BytesMut,
    dirty: &mut bool,
    cx: &mut Context<'_>,
) -> io::Result<()> {
    while !buf.is_empty() {
        match Pin::new(&mut *s).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                *dirty = true;
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(()),
        }
    }
    if *dirty {
        match Pin::new(&mut *s).poll_flush(cx) {
            Poll::Ready(Ok(())) => *dirty = false,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => {}
        }
    }
    Ok(())
}
