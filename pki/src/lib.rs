//! The cluster's PKI.
//!
//! Owns everything about certificates: creating the cluster CA, issuing
//! role certificates (`scheduler`, `worker`, `client`), loading PEM files,
//! building the rustls configs every TLS endpoint uses, and reading the role
//! and name back from a peer's certificate. It is the only crate that touches
//! rcgen or builds rustls configs. It does no networking and knows nothing
//! about gRPC or HTTP.
//!
//! # How role and name are carried
//!
//! Every leaf certificate's subject is `O=jobcluster, OU=<role>, CN=<name>`.
//! [`peer_identity`] reads exactly these two attributes; a certificate with
//! no `OU`, or an `OU` that is not a known role, has no identity.

#![forbid(unsafe_code)]

mod error;
mod identity;
mod issue;
mod tls;

pub use error::PkiError;
pub use identity::{PeerIdentity, Role, peer_identity};
pub use issue::{CertificateAuthority, IssuedCert, Validity, init_dir, issue_in_dir, valid_name};
pub use tls::{
    ClientAuth, ExpectedPeer, Identity, Roots, client_config, client_config_for, crypto_provider,
    install_crypto_provider, server_config, server_config_with,
};

/// The organisation every certificate of the cluster names in its subject.
pub const ORGANIZATION: &str = "jobcluster";

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn role_and_name_round_trip_through_a_certificate() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        for role in Role::ALL {
            let issued = ca.issue(role, "w-1.example", &[]).unwrap();
            let id =
                Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
            let peer = id.peer_identity().unwrap();
            assert_eq!(
                peer,
                PeerIdentity {
                    role,
                    name: "w-1.example".into()
                }
            );
        }
    }

    #[test]
    fn the_ca_certificate_has_no_role() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let roots_der = rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem().as_bytes());
        let err = peer_identity(&roots_der.unwrap()).unwrap_err();
        assert!(matches!(err, PkiError::NoRole), "{err}");
    }

    #[test]
    fn init_refuses_to_overwrite_and_issue_signs_with_the_dirs_ca() {
        let dir = std::env::temp_dir().join(format!("pki-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let written = init_dir(&dir, &["example.org".into()]).unwrap();
        assert_eq!(written.len(), 6);
        assert!(matches!(init_dir(&dir, &[]), Err(PkiError::Exists { .. })));
        issue_in_dir(&dir, Role::Worker, "w1", &[]).unwrap();
        assert!(matches!(
            issue_in_dir(&dir, Role::Worker, "w1", &[]),
            Err(PkiError::Exists { .. })
        ));
        assert!(matches!(
            issue_in_dir(&dir, Role::Worker, "../evil", &[]),
            Err(PkiError::BadName(_))
        ));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("w1-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The worker certificate chains to the directory's CA.
        let roots = Roots::load(&dir.join("ca.pem")).unwrap();
        let id = Identity::load(&dir.join("w1.pem"), &dir.join("w1-key.pem")).unwrap();
        server_config(&id, &roots, &[b"h2"]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
