//! A byte stream that is plain TCP or TLS on either side of the proxy.
//!
//! It only dispatches AsyncRead/AsyncWrite to the concrete stream, so a session can
//! poll reads and writes of both sockets from one task without splitting them.

use tokio::net::TcpStream;

/// Plain TCP, TLS accepted from a client, or TLS opened to the upstream.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// Whether the stream is encrypted.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }
}

pgmesh_replicator::delegate_io!(Stream, Stream::Plain, Stream::ServerTls, Stream::ClientTls);
