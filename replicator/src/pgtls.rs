//! TLS on pgmesh's own connections to its regional PostgreSQL: the proxy's upstream
//! sessions, the catalog, apply, log and LISTEN sessions (tokio-postgres) and
//! capture's replication connection ([`crate::replconn`]).
//!
//! Owns libpq's `sslmode` and `sslrootcert` URL parameters, the rustls client
//! configuration each mode means, the SSLRequest negotiation on a raw socket, and the
//! tokio-postgres connector. It never reads or writes PostgreSQL messages beyond the
//! SSLRequest and its one-byte answer.
//!
//! Modes, as in libpq: `disable` (the default), `allow`/`prefer` (TLS when the
//! server offers it), `require` (TLS or no connection), `verify-ca` (and the
//! server's chain must lead to `sslrootcert`), `verify-full` (and its certificate
//! must name the host). As in libpq, a `prefer` or `require` connection with an
//! `sslrootcert` verifies the chain like `verify-ca`; without one it encrypts but
//! does not authenticate the server. SCRAM channel binding is not offered: the
//! client says it does not support it, which every server accepts.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;
use tokio_rustls::TlsConnector;

use crate::link::tls::{load_certs, provider, TlsError};

/// The SSLRequest message: length 8, then the request code 80877103.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Errors of TLS to PostgreSQL: bad parameters, or a server that cannot be reached
/// the way they demand.
#[derive(Debug, Error)]
pub enum PgTlsError {
    #[error(
        "unknown sslmode {0:?} (use disable, allow, prefer, require, verify-ca or verify-full)"
    )]
    UnknownMode(String),
    #[error("sslmode={0} needs sslrootcert=PATH, the CA certificate that signed the server's")]
    NoRootCert(&'static str),
    #[error("sslrootcert: {0}")]
    RootCert(#[from] TlsError),
    #[error("invalid URL: {0}")]
    Url(String),
    #[error("{addr} does not accept TLS, but sslmode={mode} requires it")]
    Refused { addr: String, mode: &'static str },
    #[error("{addr} answered the TLS request with {answer:?}, not S or N")]
    BadAnswer { addr: String, answer: char },
    #[error("cannot connect to {addr}: {source}")]
    Io { addr: String, source: io::Error },
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake { addr: String, source: io::Error },
    #[error("host {0:?} is not a valid TLS server name")]
    ServerName(String),
}

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// `prefer`, and `allow` (which libpq tries the other way round; the outcome is
    /// the same set of servers).
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// Parses a libpq `sslmode` value.
    pub fn parse(s: &str) -> Result<Self, PgTlsError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(PgTlsError::UnknownMode(other.to_string())),
        })
    }

    /// The libpq spelling.
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// How to secure connections to one PostgreSQL server.
#[derive(Clone)]
pub struct PgTls {
    mode: SslMode,
    root: Option<PathBuf>,
    config: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTls")
            .field("mode", &self.mode)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// Equal settings: the same mode and root certificate file.
impl PartialEq for PgTls {
    fn eq(&self, other: &Self) -> bool {
        (self.mode, &self.root) == (other.mode, &other.root)
    }
}

impl Eq for PgTls {}

impl Default for PgTls {
    fn default() -> Self {
        Self::disabled()
    }
}

impl PgTls {
    /// Plain TCP.
    pub fn disabled() -> Self {
        PgTls {
            mode: SslMode::Disable,
            root: None,
            config: None,
        }
    }

    /// `mode` with the CA certificate file `root`; reads the file now.
    pub fn new(mode: SslMode, root: Option<PathBuf>) -> Result<Self, PgTlsError> {
        let config = match (mode, &root) {
            (SslMode::Disable, _) => None,
            (SslMode::Prefer | SslMode::Require, None) => Some(unverified_config()),
            (SslMode::Prefer | SslMode::Require | SslMode::VerifyCa, Some(r)) => {
                Some(verifying_config(r, false)?)
            }
            (SslMode::VerifyFull, Some(r)) => Some(verifying_config(r, true)?),
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(PgTlsError::NoRootCert(mode.name()))
            }
        };
        Ok(PgTls { mode, root, config })
    }

    /// Takes `sslmode` and `sslrootcert` out of a `postgres://` URL (or a libpq
    /// `key=value` string): the settings, and the rest of the text unchanged, byte for
    /// byte (other parameters keep their encoding; multi-host URLs pass through).
    pub fn from_url(url: &str) -> Result<(Self, String), PgTlsError> {
        let (mut mode, mut root) = (SslMode::Disable, None);
        let mut take = |k: &str, v: String| -> Result<bool, PgTlsError> {
            match k {
                "sslmode" => mode = SslMode::parse(&v)?,
                "sslrootcert" => root = Some(PathBuf::from(v)),
                _ => return Ok(false),
            }
            Ok(true)
        };
        let rest = take_params(url, |k, v| take(k, v))?;
        Ok((Self::new(mode, root)?, rest))
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// `sslmode=..[&sslrootcert=..]`, URL-encoded, to put these settings back into a
    /// URL's query.
    pub fn url_query(&self) -> String {
        let mut q = format!("sslmode={}", self.mode.name());
        if let Some(r) = &self.root {
            let path = r.to_string_lossy();
            q.push_str("&sslrootcert=");
            q.extend(utf8_percent_encode(&path, NON_ALPHANUMERIC));
        }
        q
    }

    /// Asks the server on `tcp` for TLS as the mode demands (SSLRequest) and returns
    /// the stream to speak the protocol on. `host` is the name the certificate must
    /// carry under `verify-full`.
    pub async fn negotiate(&self, mut tcp: TcpStream, host: &str) -> Result<PgStream, PgTlsError> {
        let Some(cfg) = &self.config else {
            return Ok(PgStream::Plain(tcp));
        };
        let addr = tcp
            .peer_addr()
            .map_or_else(|_| host.to_string(), |a| a.to_string());
        let io_err = |source| PgTlsError::Io {
            addr: addr.clone(),
            source,
        };
        tcp.write_all(&SSL_REQUEST).await.map_err(io_err)?;
        match tcp.read_u8().await.map_err(io_err)? {
            b'S' => {}
            b'N' if self.mode == SslMode::Prefer => return Ok(PgStream::Plain(tcp)),
            b'N' => {
                return Err(PgTlsError::Refused {
                    addr,
                    mode: self.mode.name(),
                })
            }
            other => {
                return Err(PgTlsError::BadAnswer {
                    addr,
                    answer: other as char,
                })
            }
        }
        let name = server_name(host)?;
        let tls = TlsConnector::from(cfg.clone())
            .connect(name, tcp)
            .await
            .map_err(|source| PgTlsError::Handshake { addr, source })?;
        Ok(PgStream::Tls(Box::new(tls)))
    }

    /// What tokio-postgres needs for these settings: its `sslmode` and a connector.
    pub fn tokio_postgres(&self) -> (tokio_postgres::config::SslMode, MakeRustls) {
        let mode = match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        };
        (mode, MakeRustls(self.config.clone()))
    }
}

/// A tokio-postgres configuration for `url`, honouring its `sslmode` and
/// `sslrootcert`, with pgmesh's keepalives and timeouts where the URL sets none (see
/// [`crate::keepalive`]), and the connector to pass to `Config::connect`.
pub fn pg_config(url: &str) -> Result<(tokio_postgres::Config, MakeRustls), PgTlsError> {
    let (tls, rest) = PgTls::from_url(url)?;
    let (rest, user_timeout) = crate::keepalive::take_user_timeout(&rest)?;
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e: tokio_postgres::Error| PgTlsError::Url(e.to_string()))?;
    let (mode, connector) = tls.tokio_postgres();
    config.ssl_mode(mode);
    crate::keepalive::client_config(&mut config, user_timeout);
    Ok((config, connector))
}

/// Takes parameters out of a `postgres://` URL's query (or a libpq `key=value`
/// string): `take` gets each one's key and value, decoded, and returns whether it
/// took it. Returns the text without the taken ones, the rest unchanged byte for
/// byte.
pub fn take_params<E: From<PgTlsError>>(
    conn: &str,
    mut take: impl FnMut(&str, String) -> Result<bool, E>,
) -> Result<String, E> {
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        let Some((base, query)) = conn.split_once('?') else {
            return Ok(conn.to_string());
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(&decode(k)?, decode(v)?)? {
                kept.push(pair);
            }
        }
        Ok(if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        })
    } else {
        // `key=value` pairs separated by spaces (values without spaces).
        let mut kept = Vec::new();
        for tok in conn.split_whitespace() {
            let (k, v) = tok.split_once('=').unwrap_or((tok, ""));
            if !take(k, v.trim_matches('\'').to_string())? {
                kept.push(tok);
            }
        }
        Ok(kept.join(" "))
    }
}

/// A URL query component, percent-decoded (`+` stays `+`, as in libpq).
fn decode(s: &str) -> Result<String, PgTlsError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| PgTlsError::Url(format!("{s:?} is not valid UTF-8 once decoded")))
}

fn server_name(host: &str) -> Result<ServerName<'static>, PgTlsError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_string()).map_err(|_| PgTlsError::ServerName(host.to_string()))
}

fn verifying_config(root: &Path, check_name: bool) -> Result<Arc<ClientConfig>, PgTlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(root)? {
        roots.add(c).map_err(TlsError::from)?;
    }
    let p = provider();
    let builder = ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::from)?;
    if check_name {
        return Ok(Arc::new(
            builder.with_root_certificates(roots).with_no_client_auth(),
        ));
    }
    let chain = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), p.clone())
        .build()
        .map_err(|e| TlsError::from(rustls::Error::General(e.to_string())))?;
    let verifier = Lenient {
        chain: Some(chain),
        provider: p,
    };
    Ok(Arc::new(
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth(),
    ))
}

/// Encrypts without authenticating the server (libpq's `require` without a root
/// certificate).
fn unverified_config() -> Arc<ClientConfig> {
    let p = provider();
    let verifier = Lenient {
        chain: None,
        provider: p.clone(),
    };
    let cfg = ClientConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Arc::new(cfg)
}

/// The checks short of `verify-full`: with `chain`, the server's chain must lead to
/// a trusted root but its name is not checked (`verify-ca`); without, any
/// certificate is accepted (`require`). The handshake's signatures are always
/// checked.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // The chain is checked before the name, so a name error means a good chain.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A socket to PostgreSQL after [`PgTls::negotiate`].
#[derive(Debug)]
pub enum PgStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl PgStream {
    /// Whether the stream is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, PgStream::Tls(_))
    }
}

/// Implements `AsyncRead` and `AsyncWrite` for an enum of streams by delegating to
/// its variants (each holding one stream, boxed or not):
/// `delegate_io!(Stream, Stream::Plain, Stream::Tls);`.
#[macro_export]
macro_rules! delegate_io {
    ($ty:ty, $($variant:path),+) => {
        impl ::tokio::io::AsyncRead for $ty {
            fn poll_read(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &mut ::tokio::io::ReadBuf<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                match self.get_mut() {
                    $($variant(s) => ::tokio::io::AsyncRead::poll_read(::std::pin::Pin::new(s), cx, buf),)+
                }
            }
        }

        impl ::tokio::io::AsyncWrite for $ty {
            fn poll_write(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &[u8],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                match self.get_mut() {
                    $($variant(s) => ::tokio::io::AsyncWrite::poll_write(::std::pin::Pin::new(s), cx, buf),)+
                }
            }

            fn poll_flush(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                match self.get_mut() {
                    $($variant(s) => ::tokio::io::AsyncWrite::poll_flush(::std::pin::Pin::new(s), cx),)+
                }
            }

            fn poll_shutdown(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                match self.get_mut() {
                    $($variant(s) => ::tokio::io::AsyncWrite::poll_shutdown(::std::pin::Pin::new(s), cx),)+
                }
            }
        }
    };
}

crate::delegate_io!(PgStream, PgStream::Plain, PgStream::Tls);

/// tokio-postgres's TLS connector over rustls (see [`pg_config`]).
#[derive(Debug, Clone)]
pub struct MakeRustls(Option<Arc<ClientConfig>>);

impl MakeTlsConnect<Socket> for MakeRustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = PgTlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, PgTlsError> {
        // tokio-postgres asks even when it will not use TLS (sslmode=disable, a Unix
        // socket with an empty host): a name it cannot use fails only on use.
        Ok(RustlsConnect {
            config: self.0.clone(),
            name: server_name(domain),
        })
    }
}

/// One connection's handshake (tokio-postgres sends the SSLRequest itself).
#[derive(Debug)]
pub struct RustlsConnect {
    config: Option<Arc<ClientConfig>>,
    name: Result<ServerName<'static>, PgTlsError>,
}

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        Box::pin(async move {
            // tokio-postgres asks only when sslmode is not disable, and then there is
            // always a configuration.
            let cfg = self
                .config
                .ok_or_else(|| io::Error::other("TLS is disabled (sslmode=disable)"))?;
            let name = self.name.map_err(io::Error::other)?;
            let s = TlsConnector::from(cfg).connect(name, socket).await?;
            Ok(RustlsStream(Box::new(s)))
        })
    }
}

/// A TLS stream tokio-postgres runs a session on.
#[derive(Debug)]
pub struct RustlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl RustlsStream {
    fn inner(self: Pin<&mut Self>) -> Pin<&mut tokio_rustls::client::TlsStream<Socket>> {
        Pin::new(&mut *self.get_mut().0)
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner().poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner().poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner().poll_shutdown(cx)
    }
}

impl tokio_postgres::tls::TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests;
