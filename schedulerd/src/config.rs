//! schedulerd's config file (SPEC §4) and its validation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jobcluster_pki::{Identity, Role, Roots};
use jobcluster_proto::config::{self, ConfigError};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub grpc_server: GrpcServer,
    #[serde(default)]
    pub http_server: HttpServer,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub workers: WorkersSection,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub scheduler: SchedulerSection,
    #[serde(default)]
    pub metrics: config::MetricsSection,
}

/// The job queue.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSection {
    /// Most jobs waiting at once; a start past it gets 429 `queue_full`.
    #[serde(default = "default_max_queued")]
    pub max_queued: u64,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        SchedulerSection {
            max_queued: default_max_queued(),
        }
    }
}

fn default_max_queued() -> u64 {
    10_000
}

/// Bearer tokens for API clients without certificates. Only their SHA-256
/// is configured, never the token itself.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    #[serde(default)]
    pub tokens: Vec<TokenEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who holds the token, for logs ("ci", "dashboard").
    pub name: String,
    /// Lowercase hex SHA-256 of the token.
    pub sha256: String,
    pub role: TokenRole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenRole {
    /// Everything.
    Operator,
    /// Reads only.
    Viewer,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcServer {
    #[serde(default = "default_grpc_addr")]
    pub addr: String,
    #[serde(default = "yes")]
    pub use_tls: bool,
    /// With `use_tls = false`: plaintext gRPC and HTTP, no authentication.
    /// Development only.
    #[serde(default)]
    pub insecure: bool,
    pub crt_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

impl Default for GrpcServer {
    fn default() -> Self {
        GrpcServer {
            addr: default_grpc_addr(),
            use_tls: true,
            insecure: false,
            crt_file: None,
            key_file: None,
            ca_file: None,
        }
    }
}

/// The HTTPS API; certificate and CA default to `[grpc_server]`'s.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpServer {
    #[serde(default = "default_http_addr")]
    pub addr: String,
    pub crt_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// Output streams open at once per job; more get 429.
    #[serde(default = "default_max_followers")]
    pub max_followers_per_job: usize,
}

fn default_max_followers() -> usize {
    64
}

impl Default for HttpServer {
    fn default() -> Self {
        HttpServer {
            max_followers_per_job: default_max_followers(),
            addr: default_http_addr(),
            crt_file: None,
            key_file: None,
            ca_file: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// The SQLite database (the default store); not with `url`.
    pub path: Option<PathBuf>,
    /// A PostgreSQL database instead (`postgres://user@host:port/db`),
    /// which several schedulers may share.
    pub url: Option<String>,
    /// The PostgreSQL password, read from this file (first line), so
    /// that the URL and this config can be readable by more than the
    /// scheduler's user.
    pub password_file: Option<PathBuf>,
    /// The CA PostgreSQL's server certificate must chain to: the
    /// connection is then TLS, verified (name included). Required for a
    /// server off this machine.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and key for PostgreSQL's `cert` authentication.
    pub crt_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Finished jobs (and groups whose jobs are all gone) are forgotten
    /// this long after they ended.
    #[serde(default = "default_keep_finished", with = "humantime_serde")]
    pub keep_finished: Duration,
    /// Schedulers sharing a PostgreSQL store: how long the leader's lease
    /// lasts. A dead leader is replaced within about this long plus a
    /// fifth of it.
    #[serde(default = "default_leader_lease", with = "humantime_serde")]
    pub leader_lease: Duration,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            path: None,
            url: None,
            password_file: None,
            ca_file: None,
            crt_file: None,
            key_file: None,
            keep_finished: default_keep_finished(),
            leader_lease: default_leader_lease(),
        }
    }
}

fn default_leader_lease() -> Duration {
    Duration::from_secs(10)
}

fn default_keep_finished() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersSection {
    /// How often workers heartbeat (told to them at registration).
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A worker not heard from for this long is `down`; its running jobs
    /// read `unknown`.
    #[serde(default = "default_down_after", with = "humantime_serde")]
    pub down_after: Duration,
    /// A worker not heard from for this long has its running and unknown
    /// jobs recorded `lost` (a terminal state: they never come back).
    #[serde(default = "default_lost_after", with = "humantime_serde")]
    pub lost_after: Duration,
    /// How long reading a job's status waits for its worker before
    /// answering from the record (marked stale).
    #[serde(default = "default_refresh_timeout", with = "humantime_serde")]
    pub refresh_timeout: Duration,
    /// How long a call to a worker may take before the API answers 503.
    #[serde(default = "default_call_timeout", with = "humantime_serde")]
    pub call_timeout: Duration,
    /// How long dialing a worker may take.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for WorkersSection {
    fn default() -> Self {
        WorkersSection {
            heartbeat_interval: default_heartbeat(),
            down_after: default_down_after(),
            lost_after: default_lost_after(),
            refresh_timeout: default_refresh_timeout(),
            call_timeout: default_call_timeout(),
            connect_timeout: default_connect_timeout(),
        }
    }
}

fn default_grpc_addr() -> String {
    "127.0.0.1:50000".to_owned()
}
fn default_http_addr() -> String {
    "127.0.0.1:3000".to_owned()
}
fn default_store_path() -> PathBuf {
    PathBuf::from("state/scheduler.db")
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(5)
}
fn default_down_after() -> Duration {
    Duration::from_secs(15)
}
fn default_lost_after() -> Duration {
    Duration::from_secs(120)
}
fn default_refresh_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_call_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(3)
}
fn yes() -> bool {
    true
}

/// Where the scheduler keeps its records.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    Postgres(crate::store::postgres::PgLocation),
}

/// A validated config with its TLS material loaded.
#[derive(Debug)]
pub struct Config {
    pub file: PathBuf,
    pub grpc_addr: String,
    pub http_addr: String,
    pub store: StoreLocation,
    pub keep_finished: Duration,
    /// `[store] leader_lease`.
    pub leader_lease: Duration,
    pub call_timeout: Duration,
    pub connect_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub down_after: Duration,
    pub lost_after: Duration,
    pub refresh_timeout: Duration,
    /// Presented to workers (as server and as client) and trusted from
    /// them; `None` in insecure (plaintext) mode.
    pub grpc_tls: Option<Tls>,
    /// Presented to API clients and trusted from them; `None` in insecure mode.
    pub http_tls: Option<Tls>,
    pub tokens: Vec<TokenEntry>,
    pub max_followers_per_job: usize,
    /// `[scheduler] max_queued`.
    pub max_queued: u64,
    /// `[metrics] addr`.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct Tls {
    pub identity: Identity,
    pub roots: Roots,
    pub files: TlsFiles,
}

/// `[store]`: SQLite at `path` (the default), or PostgreSQL at `url`.
fn store_location(
    path: &Path,
    base: &Path,
    store: &StoreSection,
) -> Result<StoreLocation, ConfigError> {
    let err = |key: &str, msg: String| ConfigError::new(path, key, msg);
    let Some(url) = &store.url else {
        for (key, set) in [
            ("store.password_file", store.password_file.is_some()),
            ("store.ca_file", store.ca_file.is_some()),
            ("store.crt_file", store.crt_file.is_some()),
            ("store.key_file", store.key_file.is_some()),
        ] {
            if set {
                return Err(err(
                    key,
                    "is for a PostgreSQL store: set store.url too".into(),
                ));
            }
        }
        let file = store.path.clone().unwrap_or_else(default_store_path);
        return Ok(StoreLocation::Sqlite(base.join(file)));
    };
    if store.path.is_some() {
        return Err(err(
            "store.url",
            "set one of store.path (SQLite) and store.url (PostgreSQL), not both".into(),
        ));
    }
    let redacted = crate::store::postgres::redact(url);
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(err(
            "store.url",
            format!("{redacted:?} is not a postgres:// or postgresql:// URL"),
        ));
    }
    let parsed = match url.parse::<tokio_postgres::Config>() {
        Ok(parsed) => parsed,
        Err(e) => return Err(err("store.url", format!("{redacted:?}: {e}"))),
    };
    // Every connection of the cluster is TLS with a verified peer; a
    // database on this machine (loopback, or a Unix socket) is the one
    // exception, as the scheduler's own SQLite file would be.
    let off_machine: Vec<String> = parsed
        .get_hosts()
        .iter()
        .filter_map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) if !on_this_machine(name) => Some(name.clone()),
            _ => None,
        })
        .collect();
    if store.ca_file.is_none() && !off_machine.is_empty() {
        return Err(err(
            "store.url",
            format!(
                "{} is not on this machine: set store.ca_file (the CA its certificate chains to) \
                 so the connection is TLS and the server verified",
                off_machine.join(", ")
            ),
        ));
    }
    let tls = match &store.ca_file {
        None => None,
        Some(ca) => {
            let roots = jobcluster_pki::Roots::load(&base.join(ca))
                .map_err(|e| err("store.ca_file", e.to_string()))?;
            let identity = match (&store.crt_file, &store.key_file) {
                (Some(crt), Some(key)) => Some(
                    Identity::load(&base.join(crt), &base.join(key))
                        .map_err(|e| err("store.crt_file", e.to_string()))?,
                ),
                (None, None) => None,
                _ => {
                    return Err(err(
                        "store.crt_file",
                        "set both store.crt_file and store.key_file, or neither".into(),
                    ));
                }
            };
            Some(
                jobcluster_pki::client_config(&roots, identity.as_ref(), &[])
                    .map_err(|e| err("store.ca_file", e.to_string()))?,
            )
        }
    };
    let password = match &store.password_file {
        Some(file) => {
            let file = base.join(file);
            let text = std::fs::read_to_string(&file)
                .map_err(|e| err("store.password_file", format!("{}: {e}", file.display())))?;
            Some(text.lines().next().unwrap_or_default().to_owned())
        }
        None => None,
    };
    Ok(StoreLocation::Postgres(
        crate::store::postgres::PgLocation {
            url: url.clone(),
            password,
            tls,
        },
    ))
}

/// A host name or address that is this machine.
fn on_this_machine(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Config {
    /// Reads and validates `path`. Relative paths are relative to the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file: ConfigFile = config::load(path)?;
        Self::validate(path, file)
    }

    fn validate(path: &Path, file: ConfigFile) -> Result<Config, ConfigError> {
        let err = |key: &str, msg: String| ConfigError::new(path, key, msg);
        let base = path.parent().unwrap_or(Path::new("."));
        let g = &file.grpc_server;
        let tls_paths = config::tls_paths(
            path,
            config::TlsKeys {
                use_tls: g.use_tls,
                insecure: g.insecure,
                crt_file: g.crt_file.as_deref(),
                key_file: g.key_file.as_deref(),
                ca_file: g.ca_file.as_deref(),
            },
        )?;
        let h = &file.http_server;
        let (grpc_tls, http_tls) = if let Some(config::TlsPaths { crt, key, ca }) = tls_paths {
            let grpc_tls = TlsFiles {
                crt: crt.clone(),
                key: key.clone(),
                ca: ca.clone(),
                section: "grpc_server",
            }
            .load(path)?;

            let http_tls = if h.crt_file.is_none() && h.key_file.is_none() && h.ca_file.is_none() {
                grpc_tls.clone()
            } else {
                let pick = |value: &Option<PathBuf>, fallback: &Path| {
                    value
                        .as_deref()
                        .map(|p| base.join(p))
                        .unwrap_or_else(|| fallback.to_owned())
                };
                TlsFiles {
                    crt: pick(&h.crt_file, &crt),
                    key: pick(&h.key_file, &key),
                    ca: pick(&h.ca_file, &ca),
                    section: "http_server",
                }
                .load(path)?
            };
            (Some(grpc_tls), Some(http_tls))
        } else {
            (None, None)
        };
        if file.workers.call_timeout.is_zero() {
            return Err(err("workers.call_timeout", "must be more than 0".into()));
        }
        if file.workers.connect_timeout.is_zero() {
            return Err(err("workers.connect_timeout", "must be more than 0".into()));
        }
        let w = &file.workers;
        if w.heartbeat_interval < Duration::from_millis(100) {
            return Err(err(
                "workers.heartbeat_interval",
                "must be at least 100ms".into(),
            ));
        }
        if w.down_after <= w.heartbeat_interval {
            return Err(err(
                "workers.down_after",
                "must be longer than workers.heartbeat_interval (a few intervals is usual)".into(),
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&file.store.leader_lease) {
            return Err(err(
                "store.leader_lease",
                "must be between 1s and 5m".into(),
            ));
        }
        if file.store.keep_finished < Duration::from_secs(24 * 3600) {
            return Err(err(
                "store.keep_finished",
                "must be at least 1d: a job must outlive the Idempotency-Key that started it (24 h)"
                    .into(),
            ));
        }
        if w.lost_after < w.down_after {
            return Err(err(
                "workers.lost_after",
                "must be at least workers.down_after (jobs are unknown before they are lost)"
                    .into(),
            ));
        }
        if w.refresh_timeout.is_zero() || w.refresh_timeout > w.call_timeout {
            return Err(err(
                "workers.refresh_timeout",
                "must be more than 0 and at most workers.call_timeout".into(),
            ));
        }
        for (i, token) in file.auth.tokens.iter().enumerate() {
            let valid = token.sha256.len() == 64
                && token
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !valid {
                return Err(err(
                    &format!("auth.tokens[{i}].sha256"),
                    "must be 64 lowercase hex digits: the SHA-256 of the token (printf %s TOKEN | sha256sum)".into(),
                ));
            }
            if token.name.is_empty() {
                return Err(err(
                    &format!("auth.tokens[{i}].name"),
                    "must not be empty".into(),
                ));
            }
        }
        if h.max_followers_per_job == 0 {
            return Err(err(
                "http_server.max_followers_per_job",
                "must be more than 0".into(),
            ));
        }
        let metrics_addr = file.metrics.socket_addr(path)?;
        Ok(Config {
            metrics_addr,
            max_queued: file.scheduler.max_queued,
            max_followers_per_job: h.max_followers_per_job,
            tokens: file.auth.tokens,
            heartbeat_interval: w.heartbeat_interval,
            down_after: w.down_after,
            lost_after: w.lost_after,
            refresh_timeout: w.refresh_timeout,
            file: path.to_owned(),
            grpc_addr: g.addr.clone(),
            http_addr: h.addr.clone(),
            store: store_location(path, base, &file.store)?,
            keep_finished: file.store.keep_finished,
            leader_lease: file.store.leader_lease,
            call_timeout: file.workers.call_timeout,
            connect_timeout: file.workers.connect_timeout,
            grpc_tls,
            http_tls,
        })
    }
}

/// Where a TLS endpoint's material comes from, for loading and reloading.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub crt: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// The config section that named them, for error messages.
    pub section: &'static str,
}

impl TlsFiles {
    /// Loads the files; the certificate must be the scheduler's.
    pub fn load(&self, file: &Path) -> Result<Tls, ConfigError> {
        let section = self.section;
        let err = |k: &str, msg: String| ConfigError::new(file, format!("{section}.{k}"), msg);
        let roots = Roots::load(&self.ca).map_err(|e| err("ca_file", e.to_string()))?;
        let identity =
            Identity::load(&self.crt, &self.key).map_err(|e| err("crt_file", e.to_string()))?;
        let peer = identity
            .peer_identity()
            .map_err(|e| err("crt_file", e.to_string()))?;
        if peer.role != Role::Scheduler {
            return Err(err(
                "crt_file",
                format!(
                    "certificate is for role {}, the scheduler needs role scheduler",
                    peer.role
                ),
            ));
        }
        Ok(Tls {
            identity,
            roots,
            files: self.clone(),
        })
    }
}
