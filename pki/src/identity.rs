use std::fmt;
use std::str::FromStr;

use crate::PkiError;

/// What a certificate's holder is in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// schedulerd: serves the HTTP API and dials workers.
    Scheduler,
    /// workerd: runs jobs and dials the scheduler.
    Worker,
    /// clusterctl and applications: call the HTTP API only.
    Client,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Scheduler, Role::Worker, Role::Client];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Scheduler => "scheduler",
            Role::Worker => "worker",
            Role::Client => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| PkiError::UnknownRole(s.to_owned()))
    }
}

/// The role and name a peer's certificate carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub role: Role,
    pub name: String,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.role, self.name)
    }
}

/// Reads the role (subject `OU`) and name (subject `CN`) from a DER
/// certificate. Call it only on a certificate the TLS layer has already
/// verified against the cluster CA: this function checks no signature.
pub fn peer_identity(cert_der: &[u8]) -> Result<PeerIdentity, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let subject = cert.subject();
    let role = subject
        .iter_organizational_unit()
        .next()
        .ok_or(PkiError::NoRole)?
        .as_str()
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?
        .parse()?;
    let name = subject
        .iter_common_name()
        .next()
        .ok_or(PkiError::NoName)?
        .as_str()
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?
        .to_owned();
    Ok(PeerIdentity { role, name })
}
