//! schedulerd: the scheduler daemon.
//!
//! Owns the cluster's view: which workers exist (registered over the
//! Scheduler gRPC service) and every job's record (embedded SQLite), and
//! serves the HTTPS API, turning each request into gRPC calls on the worker
//! that owns the job over one long-lived channel per worker.
//!
//! It must not run jobs or touch job processes (that is workerd), and it
//! never holds a lock across a network call: requests about different jobs
//! and workers never wait on one another.
//!
//! # Layout
//! - [`config`]: the TOML file and its validation.
//! - `store`: durable records (the only SQL in the workspace).
//! - `registry`: known workers and their channels.
//! - `grpc`: the Scheduler service workers call.
//! - `api`: the HTTP routes, errors and the TLS listener.

#![forbid(unsafe_code)]

mod api;
pub mod config;
mod convert;
mod grpc;
mod registry;
pub mod store;
mod time;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use jobcluster_proto::pb::scheduler_server::SchedulerServer;
use jobcluster_proto::transport;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// How long in-flight requests and open output streams get at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("tls: {0}")]
    Tls(#[from] jobcluster_pki::PkiError),
    #[error("http server: {0}")]
    Http(#[source] std::io::Error),
}

/// The listeners the daemon serves on (bound by the caller, so tests and
/// `main` choose the ports).
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
}

/// Runs the scheduler until `shutdown` resolves, then stops accepting,
/// lets in-flight requests finish (bounded), and closes the store.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let path = config.store_path.clone();
    let store = tokio::task::spawn_blocking(move || store::Store::open(&path))
        .await
        .map_err(|e| store::StoreError::Task(e.to_string()))??;

    let (worker_tls_tx, worker_tls_rx) = watch::channel(jobcluster_pki::client_config(
        &config.grpc_tls.roots,
        Some(&config.grpc_tls.identity),
        &[b"h2"],
    )?);
    let registry = Arc::new(registry::Registry::new(
        worker_tls_rx,
        config.connect_timeout,
    ));
    registry.load(store.workers().await?, time::now_ms());

    let stop = CancellationToken::new();

    let grpc_tls =
        jobcluster_pki::server_config(&config.grpc_tls.identity, &config.grpc_tls.roots, &[b"h2"])?;
    let (grpc_tls_tx, grpc_tls_rx) = watch::channel(grpc_tls);
    let service = grpc::SchedulerService {
        registry: registry.clone(),
        store: store.clone(),
        heartbeat_interval: config.heartbeat_interval,
        down_after: config.down_after,
    };
    let liveness = tokio::spawn(grpc::watch_liveness(
        registry.clone(),
        store.clone(),
        config.down_after,
        stop.clone(),
    ));
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // A registration reports every job of the worker.
        .add_service(SchedulerServer::new(service).max_decoding_message_size(64 << 20))
        .serve_with_incoming_shutdown(
            transport::tls_incoming(listeners.grpc, grpc_tls_rx),
            stop.clone().cancelled_owned(),
        );
    let grpc = tokio::spawn(grpc);

    let tokens = Arc::new(api::auth::Tokens::new(&config.tokens));
    // Without tokens, a client without a certificate gets no answer at all;
    // with tokens, it gets through the handshake and must show one.
    let client_auth = if tokens.is_empty() {
        jobcluster_pki::ClientAuth::Required
    } else {
        jobcluster_pki::ClientAuth::Optional
    };
    let http_tls = jobcluster_pki::server_config_with(
        &config.http_tls.identity,
        &config.http_tls.roots,
        &[b"h2", b"http/1.1"],
        client_auth,
    )?;
    let (http_tls_tx, http_tls_rx) = watch::channel(http_tls);
    let reloader = {
        let (file, grpc_files, http_files) = (
            config.file.clone(),
            config.grpc_tls.files.clone(),
            config.http_tls.files.clone(),
        );
        let hangups = jobcluster_proto::systemd::hangups().map_err(Error::Http)?;
        tokio::spawn(jobcluster_proto::systemd::reload_on_hangup(
            hangups,
            move || {
                let grpc = grpc_files.load(&file).map_err(|e| e.to_string())?;
                let http = http_files.load(&file).map_err(|e| e.to_string())?;
                let text = |e: jobcluster_pki::PkiError| e.to_string();
                let grpc_server =
                    jobcluster_pki::server_config(&grpc.identity, &grpc.roots, &[b"h2"])
                        .map_err(text)?;
                let worker_client =
                    jobcluster_pki::client_config(&grpc.roots, Some(&grpc.identity), &[b"h2"])
                        .map_err(text)?;
                let http_server = jobcluster_pki::server_config_with(
                    &http.identity,
                    &http.roots,
                    &[b"h2", b"http/1.1"],
                    client_auth,
                )
                .map_err(text)?;
                grpc_tls_tx.send_replace(grpc_server);
                worker_tls_tx.send_replace(worker_client);
                http_tls_tx.send_replace(http_server);
                Ok(())
            },
        ))
    };
    let listener = api::tls::TlsListener::new(listeners.http, http_tls_rx).map_err(Error::Http)?;
    let app = api::router(api::AppState {
        registry,
        store: store.clone(),
        call_timeout: config.call_timeout,
        tokens,
        followers: Arc::new(api::Followers::new(config.max_followers_per_job)),
    });
    let http = tokio::spawn(api::serve::serve(
        listener,
        app,
        stop.clone(),
        SHUTDOWN_GRACE,
    ));
    tracing::info!("scheduler ready");
    jobcluster_proto::systemd::notify_ready();

    shutdown.await;
    reloader.abort();
    jobcluster_proto::systemd::notify_stopping();
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    stop.cancel();
    // Both servers bound their own drain by the grace period.
    let (grpc, http) = tokio::join!(tokio::time::timeout(SHUTDOWN_GRACE, grpc), http);
    match grpc {
        Ok(Ok(Err(error))) => tracing::error!(%error, "grpc server failed"),
        Err(_) => tracing::warn!("grpc streams still open after the shutdown grace"),
        _ => {}
    }
    if let Err(error) = http {
        tracing::error!(%error, "http server task failed");
    }
    let _ = liveness.await;
    store.close().await?;
    tracing::info!("scheduler stopped");
    Ok(())
}
