//! rustls configuration for terminating client TLS.
//!
//! Owns building the `ServerConfig` from PEM files with an explicit crypto provider
//! (so the binary never depends on a process-wide default). It never opens sockets.
//! TLS to PostgreSQL (`sslmode`) is [`pgmesh_replicator::pgtls`], shared with the
//! replication side.

use std::path::Path;
use std::sync::Arc;

/// Errors loading TLS material (shared with peer-link TLS, which loads PEM files the
/// same way).
pub use pgmesh_replicator::link::tls::TlsError;
pub use pgmesh_replicator::link::tls::{load_certs, load_key, provider};

/// Server-side config for terminating client TLS.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    Ok(Arc::new(cfg))
}
