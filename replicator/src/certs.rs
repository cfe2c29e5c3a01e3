//! Development certificates for peer links (`pgmesh certs --out DIR --nodes a,b,c`).
//!
//! Generates a dev CA (`ca.pem`, `ca.key`) and one certificate per node (`<node>.pem`,
//! `<node>.key`) signed by it, valid for both server and client authentication, with
//! the subject alternative names `<node>`, `localhost` and `127.0.0.1`. A node listed
//! as `NODE@REGION` is bound to its region: its certificate also names `REGION`, and a
//! peer link accepts a certificate only for the region it names (see
//! `link::session`). A certificate named after a region needs no `@`. Host names that
//! peers dial a node by (`--peer NAME=HOST:PORT`) are added per node (`NODE=HOST`):
//! a DNS name with a dot, or an IP address, so that no host can pass for a region
//! (region names have neither). When the
//! directory already holds a CA made by this module, new node certificates are signed
//! by it, so nodes can be added to a running dev mesh.
//!
//! It never overwrites an existing file unless asked, writes private keys with mode
//! 0600 and atomically (no half-written key is ever visible), and is for development
//! only: production meshes bring their own CA. Private keys must never be committed.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use thiserror::Error;

use crate::link::tls;

/// Common name of the dev CA. Signing with an existing CA rebuilds its issuer name from
/// this, so it must not change.
const CA_NAME: &str = "pgmesh dev CA";
const CA_YEARS: i32 = 10;
const NODE_YEARS: i32 = 2;

/// Errors generating certificates.
#[derive(Debug, Error)]
pub enum CertError {
    #[error("invalid node name {0:?}: use letters, digits, '-', '_' and '.', not \"ca\"")]
    NodeName(String),
    #[error("invalid region {region:?} for node {node:?}: a region name is lowercase letters, digits and '_' (as `pgmesh init --region` takes it)")]
    RegionName { node: String, region: String },
    #[error("node {0:?} is also the name of a region here: its certificate would name that region too; give the node another name")]
    NodeIsRegion(String),
    #[error("host {host:?} is for node {node:?}, which is not in the list of certificates")]
    HostNode { node: String, host: String },
    #[error("invalid host {0:?}: give a DNS name with a dot (db-eu.example.com) or an IP address, which no region name can be")]
    HostName(String),
    #[error("node {0:?} is listed twice")]
    Duplicate(String),
    #[error("{0} already exists; pass overwrite to replace it")]
    Exists(PathBuf),
    #[error("{present} exists but {missing} does not; remove it or pass overwrite")]
    HalfCa { present: PathBuf, missing: PathBuf },
    #[error("{0} was not made by `pgmesh certs` (its key does not sign certificates it accepts); pass overwrite to replace it")]
    ForeignCa(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("existing CA: {0}")]
    Tls(#[from] tls::TlsError),
}

/// How [`generate_with`] treats existing files, and what else certificates name.
#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    /// Replace existing files, including the CA (which invalidates every node
    /// certificate it signed before). Default: false.
    pub overwrite: bool,
    /// More subject alternative names, as (node, host): the names peers dial that
    /// node by. Each host is a DNS name with a dot, or an IP address.
    pub hosts: Vec<(String, String)>,
}

/// One node's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFiles {
    pub node: String,
    /// The region the certificate binds the node to (`NODE@REGION`), if any.
    pub region: Option<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// True when an existing CA in the directory signed the node certificates.
    pub ca_reused: bool,
    pub nodes: Vec<NodeFiles>,
}

/// Writes a dev CA (or reuses the one in `out_dir`) and a certificate and key per node
/// (`NODE`, or `NODE@REGION` to bind the node to its region). Refuses to overwrite any
/// existing file.
pub fn generate(out_dir: &Path, nodes: &[&str]) -> Result<Generated, CertError> {
    generate_with(out_dir, nodes, GenerateOptions::default())
}

/// [`generate`] with options.
pub fn generate_with(
    out_dir: &Path,
    nodes: &[&str],
    opts: GenerateOptions,
) -> Result<Generated, CertError> {
    let mut seen = std::collections::HashSet::new();
    let mut files: Vec<NodeFiles> = Vec::with_capacity(nodes.len());
    for entry in nodes {
        let (n, region) = match entry.split_once('@') {
            Some((n, r)) => (n, Some(r)),
            None => (*entry, None),
        };
        if !valid_node_name(n) {
            return Err(CertError::NodeName(n.into()));
        }
        if let Some(r) = region.filter(|r| crate::catalog::validate_region(r).is_err()) {
            return Err(CertError::RegionName {
                node: n.into(),
                region: r.into(),
            });
        }
        if !seen.insert(n) {
            return Err(CertError::Duplicate(n.into()));
        }
        files.push(NodeFiles {
            node: n.into(),
            region: region.map(Into::into),
            cert: out_dir.join(format!("{n}.pem")),
            key: out_dir.join(format!("{n}.key")),
        });
    }
    for (node, host) in &opts.hosts {
        if !files.iter().any(|f| f.node == *node) {
            return Err(CertError::HostNode {
                node: node.clone(),
                host: host.clone(),
            });
        }
        if !valid_host(host) || files.iter().any(|f| f.node == *host) {
            return Err(CertError::HostName(host.clone()));
        }
    }
    // A certificate names its node, so a node named after another entry's region could
    // pull as that region. An entry without `@` is named after its own region.
    for f in files
        .iter()
        .filter(|f| f.region.as_ref().is_some_and(|r| *r != f.node))
    {
        if files
            .iter()
            .any(|g| g.region.as_deref() == Some(f.node.as_str()))
        {
            return Err(CertError::NodeIsRegion(f.node.clone()));
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|source| CertError::Write {
        path: out_dir.into(),
        source,
    })?;
    let ca_cert = out_dir.join("ca.pem");
    let ca_key = out_dir.join("ca.key");
    // Check everything before writing anything, so a refusal leaves no partial output.
    let reuse = !opts.overwrite && existing_ca(&ca_cert, &ca_key)?;
    if !opts.overwrite {
        for f in &files {
            for p in [&f.cert, &f.key] {
                if p.exists() {
                    return Err(CertError::Exists(p.clone()));
                }
            }
        }
    }

    let (issuer, issuer_key) = if reuse {
        let pem = std::fs::read_to_string(&ca_key).map_err(|source| CertError::Read {
            path: ca_key.clone(),
            source,
        })?;
        let key = KeyPair::from_pem(&pem)?;
        (ca_params()?.self_signed(&key)?, key)
    } else {
        let key = KeyPair::generate()?;
        let cert = ca_params()?.self_signed(&key)?;
        write_file(
            &ca_key,
            key.serialize_pem().as_bytes(),
            0o600,
            opts.overwrite,
        )?;
        write_file(&ca_cert, cert.pem().as_bytes(), 0o644, opts.overwrite)?;
        (cert, key)
    };

    let mut checked = !reuse;
    for f in &files {
        let key = KeyPair::generate()?;
        let hosts: Vec<&str> = opts
            .hosts
            .iter()
            .filter(|(n, _)| *n == f.node)
            .map(|(_, h)| h.as_str())
            .collect();
        let cert = node_params(&f.node, f.region.as_deref(), &hosts)?.signed_by(
            &key,
            &issuer,
            &issuer_key,
        )?;
        if !checked {
            // The rebuilt issuer only matches ca.pem if that CA was made here.
            verify_against(&ca_cert, cert.der())?;
            checked = true;
        }
        write_file(
            &f.key,
            key.serialize_pem().as_bytes(),
            0o600,
            opts.overwrite,
        )?;
        write_file(&f.cert, cert.pem().as_bytes(), 0o644, opts.overwrite)?;
    }
    Ok(Generated {
        ca_cert,
        ca_key,
        ca_reused: reuse,
        nodes: files,
    })
}

/// An IP address, or a DNS name with at least one dot: never a region name.
fn valid_host(h: &str) -> bool {
    if h.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    h.contains('.')
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn valid_node_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n != "ca"
        && !n.starts_with(['-', '.'])
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether a usable CA pair exists; an incomplete pair is an error.
fn existing_ca(cert: &Path, key: &Path) -> Result<bool, CertError> {
    match (cert.exists(), key.exists()) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (true, false) => Err(CertError::HalfCa {
            present: cert.into(),
            missing: key.into(),
        }),
        (false, true) => Err(CertError::HalfCa {
            present: key.into(),
            missing: cert.into(),
        }),
    }
}

fn verify_against(ca: &Path, leaf: &CertificateDer<'_>) -> Result<(), CertError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in tls::load_certs(ca)? {
        roots.add(c).map_err(|_| CertError::ForeignCa(ca.into()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), tls::provider())
        .build()
        .map_err(|_| CertError::ForeignCa(ca.into()))?;
    verifier
        .verify_client_cert(leaf, &[], UnixTime::now())
        .map_err(|_| CertError::ForeignCa(ca.into()))?;
    Ok(())
}

fn ca_params() -> Result<CertificateParams, CertError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    dn.push(DnType::OrganizationName, "pgmesh");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut p, CA_YEARS);
    Ok(p)
}

/// A node certificate's parameters: it names the node, its region if bound to one,
/// loopback, and `hosts`.
fn node_params(
    node: &str,
    region: Option<&str>,
    hosts: &[&str],
) -> Result<CertificateParams, CertError> {
    let mut names = vec![node.to_string()];
    names.extend(region.filter(|r| *r != node).map(str::to_string));
    names.extend(["localhost".to_string(), "127.0.0.1".to_string()]);
    names.extend(hosts.iter().map(|h| h.to_string()));
    let mut p = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    if let Some(r) = region {
        dn.push(DnType::OrganizationalUnitName, format!("region {r}"));
    }
    dn.push(DnType::OrganizationName, "pgmesh");
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    set_validity(&mut p, NODE_YEARS);
    Ok(p)
}

/// Valid from yesterday (tolerates small clock skew) for `years` years.
fn set_validity(p: &mut CertificateParams, years: i32) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0) - 1;
    let (y, m, d) = civil_from_days(days);
    p.not_before = rcgen::date_time_ymd(y, m, d);
    // Day 28 at most, so the end date exists in every month and year.
    p.not_after = rcgen::date_time_ymd(y + years, m, d.min(28));
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m as u8, d as u8)
}

/// Writes `data` to `path` with `mode` without ever exposing a partial file: a temp
/// file in the same directory is filled, synced, then linked (no clobber) or renamed
/// (overwrite) into place.
fn write_file(path: &Path, data: &[u8], mode: u32, overwrite: bool) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.into(),
        source,
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut o = OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = o.open(&tmp).and_then(|mut f| {
        f.write_all(data)?;
        f.sync_all()
    });
    let result = result.and_then(|()| {
        if overwrite {
            std::fs::rename(&tmp, path)
        } else {
            std::fs::hard_link(&tmp, path).and_then(|()| std::fs::remove_file(&tmp))
        }
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            return Err(CertError::Exists(path.into()));
        }
        return Err(err(e));
    }
    Ok(())
}

#[cfg(test)]
#[path = "certs_tests.rs"]
mod tests;
