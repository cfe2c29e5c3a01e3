//! Tests of the development certificates.

use super::*;

fn leaf(path: &Path) -> CertificateDer<'static> {
    tls::load_certs(path).unwrap().remove(0)
}

/// Whether `f`'s certificate is valid for `name` as a subject name.
fn names(f: &NodeFiles, name: &str) -> bool {
    let der = leaf(&f.cert);
    let cert = webpki::EndEntityCert::try_from(&der).unwrap();
    let n = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    cert.verify_is_valid_for_subject_name(&n).is_ok()
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
fn hosts_are_named_by_their_node_only() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = |list: &[(&str, &str)]| GenerateOptions {
        hosts: list
            .iter()
            .map(|(n, h)| (n.to_string(), h.to_string()))
            .collect(),
        ..GenerateOptions::default()
    };
    let opts = hosts(&[("eu", "db-eu.example.com"), ("us", "10.0.0.7")]);
    let g = generate_with(dir.path(), &["eu", "us"], opts).unwrap();
    let (eu, us) = (&g.nodes[0], &g.nodes[1]);
    assert!(names(eu, "db-eu.example.com") && names(eu, "eu") && names(eu, "localhost"));
    assert!(!names(eu, "10.0.0.7"));
    assert!(names(us, "10.0.0.7") && !names(us, "db-eu.example.com"));
    // A host that could pass for a region (no dot), or for another listed node,
    // and a host for a node not in the list, are refused before anything is written.
    for (bad, want) in [
        (hosts(&[("eu", "us")]), "HostName"),
        (hosts(&[("eu", "us.example")]), "HostName"),
        (hosts(&[("ap", "ap.example.com")]), "HostNode"),
        (hosts(&[("eu", "-x.example")]), "HostName"),
    ] {
        let other = dir.path().join(want).join(&bad.hosts[0].1);
        let err = generate_with(&other, &["eu", "us.example"], bad).unwrap_err();
        assert!(format!("{err:?}").starts_with(want), "{err:?}");
        assert!(!other.exists(), "nothing is written on a refusal");
    }
}

#[test]
fn a_node_bound_to_a_region_is_named_for_both() {
    let dir = tempfile::tempdir().unwrap();
    let g = generate(dir.path(), &["eu-2@eu", "us"]).unwrap();
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

    let opts = GenerateOptions {
        overwrite: true,
        ..GenerateOptions::default()
    };
    let again = generate_with(dir.path(), &["a"], opts).unwrap();
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
