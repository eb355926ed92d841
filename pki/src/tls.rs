use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{PeerIdentity, PkiError, Role, peer_identity};

/// The one crypto provider of the workspace (ring).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(provider())
}

/// ring's suites, AES-128-GCM first. ring's own order puts AES-256-GCM
/// first; on this project's hardware (AES-NI) AES-128-GCM encrypts a GiB
/// in 0.115 s of CPU against 0.137 s, and a job's output is encrypted and
/// decrypted twice on its way to a follower (docs/PERFORMANCE.md). 128-bit
/// keys are TLS 1.3's mandatory suite and Go's and BoringSSL's first
/// choice; every suite of ring's list is still offered, so peers that
/// prefer another still get it (a server follows the client's order).
fn provider() -> CryptoProvider {
    use rustls::CipherSuite;
    let mut provider = rustls::crypto::ring::default_provider();
    // Within each version, as ring lists TLS 1.3's suites first.
    provider.cipher_suites.sort_by_key(|suite| {
        let aes_128 = matches!(
            suite.suite(),
            CipherSuite::TLS13_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        );
        (suite.tls13().is_none(), !aes_128)
    });
    provider
}

/// Makes ring the process-wide default provider, for libraries (reqwest)
/// that look it up. Call once at the start of `main`; later calls are no-ops.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed, which is fine.
    let _ = provider().install_default();
}

/// The CA certificates a peer must chain to.
#[derive(Debug, Clone)]
pub struct Roots(Arc<RootCertStore>);

impl Roots {
    pub fn load(path: &Path) -> Result<Self, PkiError> {
        let pem = std::fs::read(path).map_err(PkiError::io(path))?;
        Self::from_pem(&pem).map_err(|what| PkiError::Pem {
            path: path.to_owned(),
            what,
        })
    }

    /// Roots from PEM text; the error says what is wrong with it.
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let mut store = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("bad PEM: {e}"))?;
            store
                .add(cert)
                .map_err(|e| format!("not a usable CA certificate: {e}"))?;
        }
        if store.is_empty() {
            return Err("no CA certificate found".to_owned());
        }
        Ok(Roots(Arc::new(store)))
    }
}

/// A certificate chain and its private key: what an endpoint presents.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Identity")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert_pem = std::fs::read(cert_path).map_err(PkiError::io(cert_path))?;
        let key_pem = std::fs::read(key_path).map_err(PkiError::io(key_path))?;
        let chain = certs_from_pem(&cert_pem).map_err(|what| PkiError::Pem {
            path: cert_path.to_owned(),
            what,
        })?;
        let key = key_from_pem(&key_pem).map_err(|what| PkiError::Pem {
            path: key_path.to_owned(),
            what,
        })?;
        Ok(Identity { chain, key })
    }

    /// An identity from PEM text; the error says what is wrong with it.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, String> {
        Ok(Identity {
            chain: certs_from_pem(cert_pem)?,
            key: key_from_pem(key_pem)?,
        })
    }

    /// The role and name this identity's own certificate carries.
    pub fn peer_identity(&self) -> Result<PeerIdentity, PkiError> {
        let leaf = self.chain.first().ok_or(PkiError::NoName)?;
        peer_identity(leaf)
    }
}

fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate found".to_owned());
    }
    Ok(chain)
}

fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no usable private key: {e}"))
}

/// Whether clients must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No certificate, no connection.
    Required,
    /// A certificate, if presented, must chain to the roots; clients without
    /// one get through the handshake (and must authenticate otherwise, e.g.
    /// with a bearer token).
    Optional,
}

/// A server config that presents `identity` and requires every client to
/// present a certificate chaining to `client_roots`.
pub fn server_config(
    identity: &Identity,
    client_roots: &Roots,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, PkiError> {
    server_config_with(identity, client_roots, alpn, ClientAuth::Required)
}

/// Like [`server_config`], choosing whether a client certificate is required.
pub fn server_config_with(
    identity: &Identity,
    client_roots: &Roots,
    alpn: &[&[u8]],
    client_auth: ClientAuth,
) -> Result<Arc<ServerConfig>, PkiError> {
    let provider = crypto_provider();
    let builder =
        WebPkiClientVerifier::builder_with_provider(client_roots.0.clone(), provider.clone());
    let verifier = match client_auth {
        ClientAuth::Required => builder.build()?,
        ClientAuth::Optional => builder.allow_unauthenticated().build()?,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Who a dialing daemon expects at the other end: not just any certificate
/// of the cluster, but the scheduler's, or the worker with this name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedPeer {
    pub role: Role,
    /// `None`: any name with that role.
    pub name: Option<String>,
}

/// Verifies the chain and host name as usual, then the role and name the
/// server's certificate carries: a worker's key cannot stand in for the
/// scheduler, nor for another worker.
#[derive(Debug)]
struct RoleVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    expected: ExpectedPeer,
}

impl rustls::client::danger::ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let peer = peer_identity(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        let name_ok = self.expected.name.as_ref().is_none_or(|n| *n == peer.name);
        if peer.role != self.expected.role || !name_ok {
            return Err(rustls::Error::General(format!(
                "server certificate is for {peer}, expected {} {}",
                self.expected.role,
                self.expected.name.as_deref().unwrap_or("(any name)")
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Like [`client_config`], and the server must also carry `expected`'s
/// role (and name).
pub fn client_config_for(
    roots: &Roots,
    identity: Option<&Identity>,
    alpn: &[&[u8]],
    expected: ExpectedPeer,
) -> Result<Arc<ClientConfig>, PkiError> {
    let provider = crypto_provider();
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots.0.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(RoleVerifier { inner, expected }));
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client config that trusts only `roots` and, if given, presents
/// `identity`. Server names are verified against the certificate's SANs.
pub fn client_config(
    roots: &Roots,
    identity: Option<&Identity>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, PkiError> {
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots.0.clone());
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::CertificateAuthority;
    use rustls::{CipherSuite, ClientConnection, ServerConnection};

    /// Runs a handshake in memory; the suite both ends agreed on.
    fn negotiate(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> CipherSuite {
        let name = rustls_pki_types::ServerName::try_from("scheduler").unwrap();
        let mut client = ClientConnection::new(client, name).unwrap();
        let mut server = ServerConnection::new(server).unwrap();
        let mut wire = Vec::new();
        while client.is_handshaking() || server.is_handshaking() {
            wire.clear();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        let agreed = client.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(
            Some(agreed),
            server.negotiated_cipher_suite().map(|s| s.suite())
        );
        agreed
    }

    #[test]
    fn our_peers_agree_on_aes_128_gcm_and_others_keep_their_choice() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let roots = Roots::from_pem(ca.cert_pem().as_bytes()).unwrap();
        let identity = |role, name| {
            let issued = ca.issue(role, name, &[]).unwrap();
            Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
        };
        let server = server_config(&identity(Role::Scheduler, "scheduler"), &roots, &[]).unwrap();
        let ours = client_config(&roots, Some(&identity(Role::Client, "c")), &[]).unwrap();
        assert_eq!(
            negotiate(ours, server.clone()),
            CipherSuite::TLS13_AES_128_GCM_SHA256
        );

        // A client with ring's own order (AES-256-GCM first) gets it.
        let issued = identity(Role::Client, "d");
        let theirs =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots.0.clone())
                .with_client_auth_cert(issued.chain.clone(), issued.key.clone_key())
                .unwrap();
        assert_eq!(
            negotiate(Arc::new(theirs), server),
            CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        // Nothing was dropped from ring's list, only moved.
        let mut ours: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        let mut ring: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        ours.sort_by_key(|s| u16::from(*s));
        ring.sort_by_key(|s| u16::from(*s));
        assert_eq!(ours, ring);
    }
}
