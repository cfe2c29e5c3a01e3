//! Development certificates for peer links (`pgmesh certs --out DIR --nodes a,b,c`).
//!
//! Generates a dev CA (`ca.pem`, `ca.key`) and one certificate per node (`<node>.pem`,
//! `<node>.key`) signed by it, valid for both server and client authentication, with
//! the subject alternative names `<node>`, `localhost` and `127.0.0.1`. A node listed
//! as `NODE@REGION` is bound to its region: its certificate also names `REGION`, and a
//! peer link accepts a certificate only for the region it names (see
//! `link::session`). A certificate named after a region needs no `@`. When the
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

/// How [`generate_with`] treats existing files.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenerateOptions {
    /// Replace existing files, including the CA (which invalidates every node
    /// certificate it signed before). Default: false.
    pub overwrite: bool,
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
        let cert =
            node_params(&f.node, f.region.as_deref())?.signed_by(&key, &issuer, &issuer_key)?;
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
/// and loopback.
fn node_params(node: &str, region: Option<&str>) -> Result<CertificateParams, CertError> {
    let mut names = vec![node.to_string()];
    names.extend(region.filter(|r| *r != node).map(str::to_string));
    names.extend(["localhost".to_string(), "127.0.0.1".to_string()]);
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
mod tests {
    use super::*;

    fn leaf(path: &Path) -> CertificateDer<'static> {
        tls::load_certs(path).unwrap().remove(0)
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn generates_a_ca_and_node_certs_it_signed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let g = generate(&out, &["a", "b-1", "c.example"]).unwrap();
        assert!(!g.ca_reused);
        assert_eq!(g.nodes.len(), 3);
        for f in &g.nodes {
            verify_against(&g.ca_cert, &leaf(&f.cert)).unwrap();
            tls::load_key(&f.key).unwrap();
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for k in std::iter::once(&g.ca_key).chain(g.nodes.iter().map(|f| &f.key)) {
                let mode = std::fs::metadata(k).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", k.display());
            }
        }
        // No temp files are left behind.
        let names: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 8, "{names:?}");
    }

    #[test]
    fn a_node_bound_to_a_region_is_named_for_both() {
        let dir = tempfile::tempdir().unwrap();
        let g = generate(dir.path(), &["eu-2@eu", "us"]).unwrap();
        let names = |f: &NodeFiles, name: &str| {
            let der = leaf(&f.cert);
            let cert = webpki::EndEntityCert::try_from(&der).unwrap();
            let n = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
            cert.verify_is_valid_for_subject_name(&n).is_ok()
        };
        let (eu2, us) = (&g.nodes[0], &g.nodes[1]);
        assert_eq!(
            (eu2.node.as_str(), eu2.region.as_deref()),
            ("eu-2", Some("eu"))
        );
        assert!(eu2.cert.ends_with("eu-2.pem"), "{}", eu2.cert.display());
        assert!(names(eu2, "eu-2") && names(eu2, "eu") && names(eu2, "localhost"));
        assert!(!names(eu2, "us"));
        assert_eq!(us.region, None);
        assert!(names(us, "us") && !names(us, "eu"));
    }

    #[test]
    fn refuses_to_overwrite_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let g = generate(dir.path(), &["a"]).unwrap();
        let before = std::fs::read(&g.nodes[0].key).unwrap();
        assert!(matches!(
            generate(dir.path(), &["b", "a"]),
            Err(CertError::Exists(p)) if p.ends_with("a.pem")
        ));
        // The refusal wrote nothing, not even b's files.
        assert!(!dir.path().join("b.pem").exists());
        assert_eq!(std::fs::read(&g.nodes[0].key).unwrap(), before);

        let again = generate_with(dir.path(), &["a"], GenerateOptions { overwrite: true }).unwrap();
        assert!(!again.ca_reused);
        assert_ne!(std::fs::read(&again.nodes[0].key).unwrap(), before);
        verify_against(&again.ca_cert, &leaf(&again.nodes[0].cert)).unwrap();
    }

    #[test]
    fn adds_nodes_with_the_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        let first = generate(dir.path(), &["a"]).unwrap();
        let ca_before = std::fs::read(&first.ca_cert).unwrap();
        let second = generate(dir.path(), &["d"]).unwrap();
        assert!(second.ca_reused);
        assert_eq!(std::fs::read(&second.ca_cert).unwrap(), ca_before);
        verify_against(&second.ca_cert, &leaf(&second.nodes[0].cert)).unwrap();
    }

    #[test]
    fn a_foreign_ca_is_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        // A CA pair whose key does not belong to the certificate.
        let other = tempfile::tempdir().unwrap();
        let a = generate(dir.path(), &[]).unwrap();
        let b = generate(other.path(), &[]).unwrap();
        std::fs::copy(&b.ca_key, &a.ca_key).unwrap();
        assert!(matches!(
            generate(dir.path(), &["x"]),
            Err(CertError::ForeignCa(_))
        ));
        assert!(!dir.path().join("x.key").exists());
    }

    #[test]
    fn bad_names_and_half_cas_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "ca", "../x", "a/b", "-a", "a b"] {
            assert!(
                matches!(generate(dir.path(), &[bad]), Err(CertError::NodeName(_))),
                "{bad:?}"
            );
        }
        for bad in ["a@", "a@EU", "a@eu-west", "a@x y", "@eu"] {
            assert!(
                matches!(
                    generate(dir.path(), &[bad]),
                    Err(CertError::NodeName(_) | CertError::RegionName { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            generate(dir.path(), &["a", "a@eu"]),
            Err(CertError::Duplicate(_))
        ));
        // A node named after another entry's region.
        assert!(matches!(
            generate(dir.path(), &["us@eu", "us-1@us"]),
            Err(CertError::NodeIsRegion(n)) if n == "us"
        ));
        assert!(!dir.path().join("us.pem").exists());
        // A region's own certificate beside a node bound to that region is fine.
        let fine = tempfile::tempdir().unwrap();
        generate(fine.path(), &["eu", "eu-2@eu", "ap@ap"]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
        assert!(matches!(
            generate(dir.path(), &["a"]),
            Err(CertError::HalfCa { .. })
        ));
    }
}
