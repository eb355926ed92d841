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
//! - `output_stream`: a worker's `StreamJob` answer read without tonic's
//!   copies, for the output the API relays.
//! - `seed`: workers of the original design (named by address, checked on
//!   instead of heartbeating).
//! - `api`: the HTTP routes, errors and the TLS listener.
//! - `metrics`: Prometheus metrics and the `[metrics] addr` listener.

#![forbid(unsafe_code)]

mod api;
pub mod config;
mod convert;
mod group_sync;
mod grpc;
mod leader;
mod metrics;
mod output_stream;
mod placement;
mod queue;
mod registry;
mod seed;
pub mod state;
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
    #[error("binding metrics.addr {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("grpc reflection: {0}")]
    Reflection(#[from] jobcluster_proto::grpc_ops::ReflectionError),
}

/// File descriptors kept for everything but accepted connections: the
/// store, the listeners, logs, and channels to the workers the scheduler
/// calls.
const RESERVED_FILES: u64 = 64;
/// What the metrics listener may use, when there is one.
const METRICS_FILES: usize = 64;

/// How the open-files limit is shared out, so that running out of file
/// descriptors never takes the API down: workers' gRPC connections get
/// what is left after the API's share, and the API's listener never uses
/// more than its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileBudget {
    /// gRPC connections accepted at once (handshaking or served); more
    /// wait in the kernel's backlog until one closes.
    grpc: usize,
    /// The HTTPS API's connections, handshakes included.
    api: usize,
}

impl FileBudget {
    fn of(limit: u64, metrics: bool) -> Self {
        let reserved = RESERVED_FILES + if metrics { METRICS_FILES as u64 } else { 0 };
        let available = usize::try_from(limit.saturating_sub(reserved)).unwrap_or(usize::MAX);
        // A quarter for the API, within what its own bounds would use.
        let api = (available / 4).clamp(16, api::serve::ConnectionShare::FULL.0);
        let grpc = available.saturating_sub(api).max(16);
        FileBudget { grpc, api }
    }
}

/// The listeners the daemon serves on (bound by the caller, so tests and
/// `main` choose the ports).
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
}

/// Forgets finished jobs older than `keep` (`[store] keep_finished`): at
/// start and every ten minutes, in batches of a few hundred rows with a
/// pause between them, so the store's writer is never held for long.
async fn prune_history(
    store: store::SharedStore,
    finished: Arc<api::finished::FinishedJobs>,
    keep: Duration,
    stop: CancellationToken,
) {
    const EVERY: Duration = Duration::from_secs(600);
    const BATCH: u32 = 500;
    loop {
        let before = time::now_ms().saturating_sub(keep.as_millis() as u64);
        let mut pruned = 0;
        loop {
            let n = match store.prune_finished(before, BATCH).await {
                Ok(n) => n,
                Err(error) => {
                    tracing::error!(%error, "could not prune finished jobs");
                    break;
                }
            };
            pruned += n;
            if n < BATCH as usize {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
                () = stop.cancelled() => return,
            }
        }
        if pruned > 0 {
            finished.clear();
            tracing::info!(jobs = pruned, keep = %humantime::format_duration(keep), "finished jobs pruned");
        }
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// How often a scheduler on a shared store writes down which workers it
/// heard from and reads what the others wrote.
fn sync_every(heartbeat_interval: Duration) -> Duration {
    (heartbeat_interval / 2).max(Duration::from_millis(50))
}

/// Where gRPC connections come from.
enum Incoming {
    Tls(tokio_stream::wrappers::ReceiverStream<Result<transport::Accepted, std::io::Error>>),
    Plain(transport::PlainIncoming),
}

/// Where API connections come from.
enum HttpListener {
    Tls(api::tls::TlsListener),
    Plain(TcpListener),
}

/// Runs the scheduler until `shutdown` resolves, then stops accepting,
/// lets in-flight requests finish (bounded), and closes the store.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let store: store::SharedStore = match &config.store {
        config::StoreLocation::Sqlite(path) => {
            let path = path.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || store::SqliteStore::open(&path))
                    .await
                    .map_err(|e| store::StoreError::Task(e.to_string()))??,
            )
        }
        config::StoreLocation::Postgres(location) => {
            let store = store::postgres::PgStore::connect(location).await?;
            tracing::info!(url = %location.redacted(), "store: PostgreSQL");
            Arc::new(store)
        }
    };
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(
            transport::bind(&addr.to_string())
                .await
                .map_err(|source| Error::Metrics { addr, source })?,
        ),
        None => None,
    };

    let open_files = jobcluster_proto::daemon::open_files_limit();
    let budget = FileBudget::of(open_files, config.metrics_addr.is_some());
    tracing::info!(
        open_files,
        grpc_connections = budget.grpc,
        api_connections = budget.api,
        "connections bounded by the open files limit"
    );
    let api_share = api::serve::ConnectionShare(budget.api);

    let stop = CancellationToken::new();
    let tokens = Arc::new(api::auth::Tokens::new(&config.tokens));
    let secure = config.grpc_tls.as_ref().zip(config.http_tls.as_ref());

    // Mutual TLS everywhere, with every config behind a watch channel so
    // SIGHUP can swap certificates; or, in insecure mode, plaintext.
    let mut reloader = None;
    let (worker_tls, grpc_incoming, http_listener) = match secure {
        Some((grpc_tls, http_tls)) => {
            // A client without a certificate gets through the handshake:
            // it may call the health probes, and every other route wants
            // a bearer token from it (api::auth).
            let client_auth = jobcluster_pki::ClientAuth::Optional;
            if tokens.is_empty() {
                tracing::info!(
                    "no [auth] tokens: every API route but /healthz and /readyz wants a client certificate"
                );
            }
            let configs = move |grpc: &config::Tls, http: &config::Tls| {
                Ok::<_, jobcluster_pki::PkiError>((
                    // Workers' certificates only: a client's or the
                    // scheduler's own key cannot pose as a worker.
                    jobcluster_pki::client_config_for(
                        &grpc.roots,
                        Some(&grpc.identity),
                        &[b"h2"],
                        jobcluster_pki::ExpectedPeer {
                            role: jobcluster_pki::Role::Worker,
                            name: None,
                        },
                    )?,
                    jobcluster_pki::server_config(&grpc.identity, &grpc.roots, &[b"h2"])?,
                    jobcluster_pki::server_config_with(
                        &http.identity,
                        &http.roots,
                        &[b"h2", b"http/1.1"],
                        client_auth,
                    )?,
                ))
            };
            let (worker_client, grpc_server, http_server) = configs(grpc_tls, http_tls)?;
            let (worker_tx, worker_rx) = watch::channel(worker_client);
            let (grpc_tx, grpc_rx) = watch::channel(grpc_server);
            let (http_tx, http_rx) = watch::channel(http_server);
            let (file, grpc_files, http_files) = (
                config.file.clone(),
                grpc_tls.files.clone(),
                http_tls.files.clone(),
            );
            let hangups = jobcluster_proto::daemon::hangups().map_err(Error::Http)?;
            reloader = Some(tokio::spawn(jobcluster_proto::daemon::reload_on_hangup(
                hangups,
                move || {
                    let grpc = grpc_files.load(&file).map_err(|e| e.to_string())?;
                    let http = http_files.load(&file).map_err(|e| e.to_string())?;
                    let (worker_client, grpc_server, http_server) =
                        configs(&grpc, &http).map_err(|e| e.to_string())?;
                    worker_tx.send_replace(worker_client);
                    grpc_tx.send_replace(grpc_server);
                    http_tx.send_replace(http_server);
                    Ok(())
                },
            )));
            (
                Some(worker_rx),
                Incoming::Tls(transport::tls_incoming_with(
                    listeners.grpc,
                    grpc_rx,
                    transport::ConnectionLimits {
                        handshakes: transport::MAX_HANDSHAKES.min(budget.grpc),
                        connections: Some(Arc::new(tokio::sync::Semaphore::new(budget.grpc))),
                        // A connection per worker, idle between heartbeats.
                        lean: true,
                    },
                )),
                HttpListener::Tls(
                    api::tls::TlsListener::new(
                        listeners.http,
                        http_rx,
                        transport::ConnectionLimits {
                            handshakes: api_share.handshakes(),
                            connections: None,
                            lean: false,
                        },
                    )
                    .map_err(Error::Http)?,
                ),
            )
        }
        None => (
            None,
            Incoming::Plain(transport::plain_incoming(listeners.grpc)),
            HttpListener::Plain(listeners.http),
        ),
    };

    // This process, as a candidate for the leader's lease.
    let holder = uuid::Uuid::new_v4().to_string();
    let registry = Arc::new(registry::Registry::new(worker_tls, config.connect_timeout));
    if store.shared() {
        registry.keep_heard();
        tracing::info!(%holder, "store shared with other schedulers: one of them leads");
    }
    registry.load(store.workers().await?, time::now_ms());
    registry.load_removed(store.removed_worker_ids().await?);

    let queue = Arc::new(queue::Queue::new(config.max_queued));
    let service = grpc::SchedulerService {
        queue: queue.clone(),
        registry: registry.clone(),
        store: store.clone(),
        heartbeat_interval: config.heartbeat_interval,
        down_after: config.down_after,
        call_timeout: config.call_timeout,
        insecure: secure.is_none(),
    };
    let (grpc_health, health_service) =
        jobcluster_proto::grpc_ops::health::<SchedulerServer<grpc::SchedulerService>>().await;
    let (reflection, reflection_v1alpha) = jobcluster_proto::grpc_ops::reflection()?;
    let routes = tonic::service::Routes::new(
        // A registration reports every job of the worker.
        SchedulerServer::new(service).max_decoding_message_size(64 << 20),
    )
    .add_service(health_service)
    .add_service(reflection)
    .add_service(reflection_v1alpha);
    let stopped = stop.clone().cancelled_owned();
    let grpc = match grpc_incoming {
        Incoming::Tls(incoming) => tokio::spawn(transport::serve_grpc(incoming, routes, stopped)),
        Incoming::Plain(incoming) => tokio::spawn(transport::serve_grpc(incoming, routes, stopped)),
    };

    let app_state = api::AppState {
        registry,
        store: store.clone(),
        call_timeout: config.call_timeout,
        refresh_timeout: config.refresh_timeout,
        tokens,
        followers: Arc::new(api::Followers::new(config.max_followers_per_job)),
        taps: Arc::default(),
        insecure: secure.is_none(),
        placement_turn: Default::default(),
        claims: Default::default(),
        queue,
        readiness: Default::default(),
        acting: Default::default(),
        finished: Default::default(),
    };
    let readiness = app_state.readiness.clone();
    // What must run once in the cluster: on the leader only, through a
    // store fenced with its term.
    let lead = {
        let (app_state, registry) = (app_state.clone(), app_state.registry.clone());
        let (keep, heartbeat_interval, call_timeout) = (
            config.keep_finished,
            config.heartbeat_interval,
            config.call_timeout,
        );
        let liveness = grpc::Liveness {
            heartbeat_interval: config.heartbeat_interval,
            down_after: config.down_after,
            lost_after: config.lost_after,
            // What other schedulers heard reaches this one through the
            // store, up to one sync later.
            // (the scheduler that heard it writes it down at its next
            // sync, this one reads it at its own: up to two syncs).
            lag: if store.shared() {
                sync_every(config.heartbeat_interval) * 2
            } else {
                Duration::ZERO
            },
        };
        let work = move |store: store::SharedStore, stop: CancellationToken, acting| {
            let state = api::AppState {
                store: store.clone(),
                acting,
                ..app_state.clone()
            };
            vec![
                tokio::spawn(grpc::watch_liveness(
                    registry.clone(),
                    store.clone(),
                    liveness,
                    stop.clone(),
                )),
                tokio::spawn(seed::check_workers(
                    registry.clone(),
                    store.clone(),
                    heartbeat_interval,
                    call_timeout,
                    stop.clone(),
                )),
                tokio::spawn(api::dispatch::run(state.clone(), stop.clone())),
                tokio::spawn(api::jobs::settle_unknown(state.clone(), stop.clone())),
                tokio::spawn(prune_history(
                    store.clone(),
                    state.finished.clone(),
                    keep,
                    stop.clone(),
                )),
                tokio::spawn(api::idempotency::prune_expired(store, stop)),
            ]
        };
        tokio::spawn(leader::run(
            store.clone(),
            holder.clone(),
            leader::Lease {
                ttl: config.leader_lease,
            },
            work,
            stop.clone(),
        ))
    };
    let syncing = store.shared().then(|| {
        let (registry, store) = (app_state.registry.clone(), store.clone());
        tokio::spawn(leader::every(
            sync_every(config.heartbeat_interval),
            stop.clone(),
            move || {
                let (registry, store) = (registry.clone(), store.clone());
                async move { registry.sync(&store).await }
            },
        ))
    });
    let metrics_server = metrics_listener.map(|(listener, addr)| {
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "metrics.addr is not a loopback address: anyone who reaches it reads the metrics, without credentials");
        }
        tracing::info!(%addr, "metrics server listening");
        tokio::spawn(api::serve::serve(
            listener,
            |_, addr| api::tls::PeerInfo {
                addr,
                identity: None,
            },
            metrics::plain_router(app_state.clone()),
            stop.clone(),
            SHUTDOWN_GRACE,
            api::serve::ConnectionShare(METRICS_FILES),
        ))
    });
    let app = api::router(app_state);
    let http = match http_listener {
        HttpListener::Tls(listener) => tokio::spawn(api::serve::serve(
            listener,
            api::tls::PeerInfo::of,
            app,
            stop.clone(),
            SHUTDOWN_GRACE,
            api_share,
        )),
        HttpListener::Plain(listener) => tokio::spawn(api::serve::serve(
            listener,
            |_, addr| api::tls::PeerInfo {
                addr,
                identity: None,
            },
            app,
            stop.clone(),
            SHUTDOWN_GRACE,
            api_share,
        )),
    };
    readiness.set_serving(true);
    grpc_health.serving().await;
    tracing::info!("scheduler ready");
    jobcluster_proto::daemon::notify_ready();

    shutdown.await;
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    jobcluster_proto::daemon::notify_stopping();
    readiness.set_serving(false);
    grpc_health.not_serving().await;
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    stop.cancel();
    // Both servers bound their own drain by the grace period.
    let (grpc, http) = tokio::join!(tokio::time::timeout(SHUTDOWN_GRACE, grpc), http);
    match grpc {
        Ok(Err(error)) => tracing::error!(%error, "grpc server task failed"),
        Err(_) => tracing::warn!("grpc streams still open after the shutdown grace"),
        _ => {}
    }
    if let Err(error) = http {
        tracing::error!(%error, "http server task failed");
    }
    if let Some(metrics_server) = metrics_server {
        let _ = metrics_server.await;
    }
    let _ = lead.await;
    if let Some(syncing) = syncing {
        let _ = syncing.await;
    }
    store.close().await?;
    tracing::info!("scheduler stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_leaves_the_api_its_share() {
        // The machine: 1,024.
        let small = FileBudget::of(1024, false);
        assert_eq!(
            small,
            FileBudget {
                grpc: 720,
                api: 240
            }
        );
        // The shipped units' LimitNOFILE: the API's own bounds cap its share.
        let large = FileBudget::of(65536, true);
        assert_eq!(large.api, api::serve::ConnectionShare::FULL.0);
        assert_eq!(large.grpc, 65536 - 128 - large.api);
        // Tiny or unreadable limits still serve someone.
        assert_eq!(FileBudget::of(0, false), FileBudget { grpc: 16, api: 16 });
    }
}
