//! Turns transport errors into one line that says what to do.
//!
//! reqwest wraps hyper, which wraps the connector's io and rustls errors;
//! the useful cause is somewhere down that chain. io errors hide the error
//! they carry from `source()`, so each io error's payload is looked at too.

use std::error::Error;
use std::io;

use rustls::{AlertDescription, CertificateError};

const SCHEDULER_HINT: &str = "is schedulerd running? set --scheduler or CLUSTERCTL_SCHEDULER";
const CA_HINT: &str = "check --ca / CLUSTERCTL_CA";
const CLIENT_CERT_HINT: &str = "pass a client certificate of the cluster's CA with --cert/--key \
    or CLUSTERCTL_CERT/CLUSTERCTL_KEY, or a token (--token-file)";

/// The message for a failed request to the scheduler at `base`, and whether
/// trying again later may help.
pub(crate) fn transport(base: &str, err: &(dyn Error + 'static)) -> (String, bool) {
    let chain = chain(err);

    if let Some(tls) = chain.iter().find_map(|e| as_rustls(*e)) {
        return tls_message(base, tls);
    }
    let reqwest = chain
        .iter()
        .find_map(|e| e.downcast_ref::<reqwest::Error>());
    let io_kind = chain
        .iter()
        .find_map(|e| e.downcast_ref::<io::Error>())
        .map(io::Error::kind);

    if io_kind == Some(io::ErrorKind::ConnectionRefused) {
        return (
            format!("cannot reach the scheduler at {base}: connection refused ({SCHEDULER_HINT})"),
            true,
        );
    }
    if reqwest.is_some_and(reqwest::Error::is_dns) {
        return (
            format!(
                "cannot resolve the scheduler's host in {base}: {} (set --scheduler or \
                 CLUSTERCTL_SCHEDULER)",
                innermost(err)
            ),
            true,
        );
    }
    if reqwest.is_some_and(reqwest::Error::is_timeout) || io_kind == Some(io::ErrorKind::TimedOut) {
        return (
            format!("timed out talking to the scheduler at {base} ({SCHEDULER_HINT})"),
            true,
        );
    }
    if reqwest.is_some_and(reqwest::Error::is_connect) {
        return (
            format!(
                "cannot reach the scheduler at {base}: {} ({SCHEDULER_HINT})",
                innermost(err)
            ),
            true,
        );
    }
    if reqwest.is_some_and(reqwest::Error::is_builder) {
        return (
            format!("cannot build the request to {base}: {}", innermost(err)),
            false,
        );
    }
    (
        format!(
            "the connection to the scheduler at {base} failed: {} (if the scheduler is up, \
             it may have refused the client certificate: check --cert/--key)",
            innermost(err)
        ),
        true,
    )
}

fn tls_message(base: &str, tls: &rustls::Error) -> (String, bool) {
    let message = match tls {
        // Two CAs made by `pki init` share a subject name, so a certificate
        // of the other one fails its signature check rather than its issuer.
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!(
            "cannot verify the scheduler at {base}: certificate signed by an unknown CA \
             ({CA_HINT})"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the scheduler's certificate is not valid for the host in {base} (connect by a \
             name or address the certificate carries, or issue one with --san HOST)"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => format!(
            "the scheduler's certificate at {base} is expired or not yet valid (check the \
             clocks, or issue a new one)"
        ),
        rustls::Error::InvalidCertificate(other) => format!(
            "the scheduler at {base} presented an unusable certificate: {other:?} ({CA_HINT})"
        ),
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::CertificateRequired
            // What rustls answers a client certificate whose signature
            // does not verify (signed by another CA of the same name).
            | AlertDescription::DecryptError),
        ) => format!(
            "the scheduler at {base} refused the client certificate ({alert:?}): \
             {CLIENT_CERT_HINT}"
        ),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => format!(
            "TLS handshake with {base} failed: {tls} (is that the scheduler's HTTPS API port?)"
        ),
        other => format!("TLS with the scheduler at {base} failed: {other}"),
    };
    (message, false)
}

/// The error and all its causes, outermost first.
fn chain<'a>(err: &'a (dyn Error + 'static)) -> Vec<&'a (dyn Error + 'static)> {
    let mut all = vec![err];
    let mut next = err.source();
    while let Some(e) = next {
        all.push(e);
        next = e.source();
    }
    all
}

/// The rustls error `e` is or carries (io errors carry one as payload,
/// sometimes inside another io error, as hyper-rustls wraps tokio-rustls).
fn as_rustls<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    let mut payload = e.downcast_ref::<io::Error>()?.get_ref()?;
    loop {
        if let Some(tls) = payload.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        payload = payload.downcast_ref::<io::Error>()?.get_ref()?;
    }
}

/// What really happened: the deepest io error of a known kind in plain
/// words, or else the deepest cause's message.
pub(crate) fn innermost(err: &(dyn Error + 'static)) -> String {
    let chain = chain(err);
    let known_io = chain.iter().rev().find_map(|e| {
        let io = e.downcast_ref::<io::Error>()?;
        known_io_reason(io.kind())
    });
    match (known_io, chain.last()) {
        (Some(reason), _) => reason.to_owned(),
        (None, Some(e)) => e.to_string(),
        (None, None) => err.to_string(),
    }
}

/// An io error in lowercase words, without the os error number.
pub(crate) fn io_reason(e: &io::Error) -> String {
    known_io_reason(e.kind()).map_or_else(|| e.to_string(), str::to_owned)
}

fn known_io_reason(kind: io::ErrorKind) -> Option<&'static str> {
    Some(match kind {
        io::ErrorKind::NotFound => "no such file",
        io::ErrorKind::PermissionDenied => "permission denied",
        io::ErrorKind::ConnectionRefused => "connection refused",
        io::ErrorKind::ConnectionReset => "connection reset",
        io::ErrorKind::ConnectionAborted => "connection aborted",
        io::ErrorKind::BrokenPipe => "connection closed",
        io::ErrorKind::TimedOut => "timed out",
        // Also rustls' "peer closed connection without sending TLS
        // close_notify", which comes with a long link.
        io::ErrorKind::UnexpectedEof => "connection closed unexpectedly",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error with a source, like hyper's wrappers.
    #[derive(Debug)]
    struct Wrap(&'static str, Box<dyn Error + Send + Sync>);

    impl std::fmt::Display for Wrap {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Wrap {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.1)
        }
    }

    const BASE: &str = "https://127.0.0.1:3000";

    #[test]
    fn refused_connection_says_to_start_or_point_at_the_scheduler() {
        let err = Wrap(
            "client error (Connect)",
            Box::new(Wrap(
                "tcp connect error",
                Box::new(io::Error::from(io::ErrorKind::ConnectionRefused)),
            )),
        );
        let (message, retry) = transport(BASE, &err);
        assert_eq!(
            message,
            "cannot reach the scheduler at https://127.0.0.1:3000: connection refused \
             (is schedulerd running? set --scheduler or CLUSTERCTL_SCHEDULER)"
        );
        assert!(retry);
    }

    #[test]
    fn tls_errors_inside_io_errors_are_found() {
        let unknown_ca = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let err = Wrap(
            "client error (Connect)",
            Box::new(io::Error::other(io::Error::new(
                io::ErrorKind::InvalidData,
                unknown_ca,
            ))),
        );
        let (message, retry) = transport(BASE, &err);
        assert!(
            message.contains("certificate signed by an unknown CA (check --ca / CLUSTERCTL_CA)"),
            "{message}"
        );
        assert!(!retry);

        let refused = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        let err = Wrap("connection error", Box::new(io::Error::other(refused)));
        let (message, _) = transport(BASE, &err);
        assert!(
            message.contains("refused the client certificate"),
            "{message}"
        );
        assert!(message.contains("--cert/--key"), "{message}");
    }

    #[test]
    fn other_errors_name_the_innermost_cause() {
        let err = Wrap(
            "error sending request",
            Box::new(io::Error::from(io::ErrorKind::ConnectionReset)),
        );
        let (message, retry) = transport(BASE, &err);
        assert!(message.contains("failed: connection reset"), "{message}");
        assert!(retry);
    }
}
