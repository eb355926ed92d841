use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::OffsetDateTime;

use crate::{ORGANIZATION, PkiError, Role};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Clocks of cluster machines drift; a certificate valid "from now" would be
/// refused by a peer whose clock is a little behind.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From a few minutes ago (for clock skew) until `days` from now.
    pub fn days(days: u32) -> Self {
        let now = SystemTime::now();
        Validity {
            not_before: now - CLOCK_SKEW,
            not_after: now + DAY * days,
        }
    }
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster CA: signs role certificates.
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA, valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(None, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, Validity::days(3650));
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA of a directory made by [`init_dir`].
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca-key.pem");
        let cert_pem = fs::read_to_string(&cert_path).map_err(PkiError::io(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(PkiError::io(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Pem {
            path: key_path,
            what: format!("not a usable private key: {e}"),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| PkiError::Pem {
            path: cert_path,
            what: format!("not a usable CA certificate: {e}"),
        })?;
        Ok(CertificateAuthority {
            cert_pem,
            key_pem,
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A certificate for `role` and `name`, valid for a little over two years.
    /// `sans` (host names or IP addresses) are added to `localhost`,
    /// `127.0.0.1` and, when it is a valid host name, `name` itself.
    pub fn issue(&self, role: Role, name: &str, sans: &[String]) -> Result<IssuedCert, PkiError> {
        self.issue_with_validity(role, name, sans, Validity::days(825))
    }

    /// Like [`issue`](Self::issue), with an explicit validity (tests use it
    /// for expired and not-yet-valid certificates).
    pub fn issue_with_validity(
        &self,
        role: Role,
        name: &str,
        sans: &[String],
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        if !valid_name(name) {
            return Err(PkiError::BadName(name.to_owned()));
        }
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        if name.parse::<std::net::IpAddr>().is_err()
            && rcgen::string::Ia5String::try_from(name).is_ok()
        {
            names.push(name.to_owned());
        }
        for san in sans {
            if !names.contains(san) {
                names.push(san.clone());
            }
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name = distinguished_name(Some(role), name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            // Both daemons listen and dial, so their certificates serve both ways.
            Role::Scheduler | Role::Worker => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, validity);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Whether `name` can be a certificate name: 1 to 64 of letters, digits,
/// `.`, `-`, `_`, not starting with `.` or `-` (names become file names).
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Creates `dir` with a new CA and the scheduler and client certificates.
/// Refuses to touch a directory that already holds a CA. Returns the files
/// written.
pub fn init_dir(dir: &Path, sans: &[String]) -> Result<Vec<PathBuf>, PkiError> {
    for existing in ["ca.pem", "ca-key.pem"] {
        let path = dir.join(existing);
        if path.exists() {
            return Err(PkiError::Exists { path });
        }
    }
    fs::create_dir_all(dir).map_err(PkiError::io(dir))?;
    // A distinct subject per CA: peers verifying against another cluster's
    // CA then report an unknown issuer, not a confusing bad signature.
    let nonce = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let ca = CertificateAuthority::generate(&format!("jobcluster CA {nonce:x}"))?;
    let mut written = write_pair(dir, "ca", ca.cert_pem(), ca.key_pem())?;
    written.extend(issue_in_dir(dir, Role::Scheduler, "scheduler", sans)?);
    written.extend(issue_in_dir(dir, Role::Client, "client", sans)?);
    Ok(written)
}

/// Issues `NAME.pem` and `NAME-key.pem` in `dir`, signed by the CA in `dir`.
/// Never overwrites a file. Returns the files written.
pub fn issue_in_dir(
    dir: &Path,
    role: Role,
    name: &str,
    sans: &[String],
) -> Result<Vec<PathBuf>, PkiError> {
    if !valid_name(name) {
        return Err(PkiError::BadName(name.to_owned()));
    }
    let ca = CertificateAuthority::load(dir)?;
    let issued = ca.issue(role, name, sans)?;
    write_pair(dir, name, &issued.cert_pem, &issued.key_pem)
}

fn write_pair(dir: &Path, name: &str, cert: &str, key: &str) -> Result<Vec<PathBuf>, PkiError> {
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}-key.pem"));
    // Check both first so a refusal leaves nothing half-written.
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(PkiError::Exists { path: path.clone() });
        }
    }
    write_new(&key_path, key, 0o600)?;
    write_new(&cert_path, cert, 0o644)?;
    Ok(vec![cert_path, key_path])
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => PkiError::Exists {
                path: path.to_owned(),
            },
            _ => PkiError::Io {
                path: path.to_owned(),
                source,
            },
        })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(PkiError::io(path))
}

fn distinguished_name(role: Option<Role>, common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    if let Some(role) = role {
        dn.push(DnType::OrganizationalUnitName, role.as_str());
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    params.not_before = OffsetDateTime::from(validity.not_before);
    params.not_after = OffsetDateTime::from(validity.not_after);
}
