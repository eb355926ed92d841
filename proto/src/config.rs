//! Reading the daemons' TOML config files (SPEC §4), with errors that name
//! the file, the key and what is wrong with it, on one line.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A config file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}{message}", file.display(), key.as_deref().map(|k| format!("{k}: ")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    /// Dotted key (`plugins.bash.interpreter`), when the error is about one.
    pub key: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: &Path, key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_owned(),
            key: Some(key.into()),
            message: message.into(),
        }
    }
}

/// The `[grpc_server]` TLS keys every daemon has, as written.
#[derive(Debug, Clone, Copy)]
pub struct TlsKeys<'a> {
    pub use_tls: bool,
    pub insecure: bool,
    pub crt_file: Option<&'a Path>,
    pub key_file: Option<&'a Path>,
    pub ca_file: Option<&'a Path>,
}

/// Certificate, key and CA paths, resolved against the config's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub crt: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// The TLS paths a daemon must load, or `None` in insecure (plaintext)
/// mode. Plaintext needs both `use_tls = false` and `insecure = true`, so it
/// is never the result of a typo; `insecure` alone is refused too. With
/// TLS, all three files are required.
pub fn tls_paths(file: &Path, keys: TlsKeys<'_>) -> Result<Option<TlsPaths>, ConfigError> {
    match (keys.use_tls, keys.insecure) {
        (true, false) => {}
        (false, true) => return Ok(None),
        (false, false) => {
            return Err(ConfigError::new(
                file,
                "grpc_server.use_tls",
                "false needs grpc_server.insecure = true as well: without TLS nothing is authenticated or encrypted",
            ));
        }
        (true, true) => {
            return Err(ConfigError::new(
                file,
                "grpc_server.insecure",
                "true only goes with use_tls = false; remove it to keep TLS",
            ));
        }
    }
    let base = file.parent().unwrap_or(Path::new("."));
    let need = |value: Option<&Path>, key: &str| {
        value
            .map(|p| base.join(p))
            .ok_or_else(|| ConfigError::new(file, key, "missing: mutual TLS needs it"))
    };
    Ok(Some(TlsPaths {
        crt: need(keys.crt_file, "grpc_server.crt_file")?,
        key: need(keys.key_file, "grpc_server.key_file")?,
        ca: need(keys.ca_file, "grpc_server.ca_file")?,
    }))
}

/// Reads and deserializes `path`. Unknown keys are refused by the target
/// types (`deny_unknown_fields`); this function puts the key's path into the
/// error.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        key: None,
        message: format!("cannot read config: {e}"),
    })?;
    parse(path, &text)
}

/// Deserializes `text` as if it were the contents of `path`.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let line_of = |span: Option<std::ops::Range<usize>>| {
        span.map(|s| text[..s.start.min(text.len())].lines().count().max(1))
    };
    let deserializer = toml::Deserializer::parse(text).map_err(|e| ConfigError {
        file: path.to_owned(),
        key: line_of(e.span()).map(|l| format!("line {l}")),
        message: one_line(e.message()),
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        ConfigError {
            file: path.to_owned(),
            key: (key != ".").then_some(key),
            message: one_line(inner.message()),
        }
    })
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        server: Inner,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        addr: String,
    }

    #[test]
    fn errors_name_file_and_key() {
        let file = Path::new("w.toml");
        let err = parse::<Outer>(file, "[server]\naddr = 3\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("server.addr"), "{err}");
        assert!(
            err.to_string().starts_with("w.toml: server.addr: "),
            "{err}"
        );
        let err = parse::<Outer>(file, "[server]\naddr = \"x\"\nport = 1\n").unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
        let err = parse::<Outer>(file, "[server\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("line 1"), "{err}");
    }
}

/// `[metrics]` of both daemons: a plaintext listener for Prometheus
/// scrapers, meant for loopback; absent: none.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Serves `GET /metrics` in plaintext without credentials.
    pub addr: Option<String>,
}

impl MetricsSection {
    /// The listener's address, checked: `metrics.addr` must be an IP
    /// address and port (no names to resolve at start).
    pub fn socket_addr(&self, file: &Path) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        self.addr
            .as_deref()
            .map(|addr| {
                addr.parse().map_err(|_| {
                    ConfigError::new(
                        file,
                        "metrics.addr",
                        format!("{addr:?} must be an IP address and port, like 127.0.0.1:9464"),
                    )
                })
            })
            .transpose()
    }
}
