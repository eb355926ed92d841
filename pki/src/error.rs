use std::path::PathBuf;

/// Everything that can go wrong with certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Pem { path: PathBuf, what: String },
    #[error("{} already exists; remove it or choose another directory", path.display())]
    Exists { path: PathBuf },
    #[error("invalid certificate name {0:?}: use letters, digits, '.', '-' and '_' (at most 64)")]
    BadName(String),
    #[error("unknown role {0:?}: expected scheduler, worker or client")]
    UnknownRole(String),
    #[error("certificate carries no cluster role (subject OU)")]
    NoRole,
    #[error("certificate carries no name (subject CN)")]
    NoName,
    #[error("malformed certificate: {0}")]
    BadCertificate(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

impl PkiError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}
