//! workerd: the worker daemon.
//!
//! Owns running jobs on this machine: validating a request against its
//! scripts directory and plugins, spawning each job in its own process
//! group, keeping its output log and record under `state_dir`, streaming
//! output to any number of followers, and stopping whole process trees. It
//! serves the Worker gRPC service over mutual TLS and accepts calls only from
//! the scheduler's certificate.
//!
//! It must not decide placement or keep cluster state (that is schedulerd),
//! and it is the only crate that spawns processes.
//!
//! # Layout
//! - [`config`]: the TOML file and its validation.
//! - `confine`: the path rules of SPEC §7.
//! - [`job`]: spawning, supervising, stopping, the output log (one file per concern).
//! - `service`: the gRPC surface; `output_route`: its `StreamJob` messages
//!   sent without tonic's encoding copy.
//! - `metrics`: Prometheus metrics and the `[metrics] addr` listener.

mod cgroup;
pub mod config;
mod confine;
mod job;
mod membership;
mod metrics;
mod output_route;
mod retention;
mod service;
mod sys;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use jobcluster_proto::pb::RegisterWorkerRequest;
use jobcluster_proto::pb::scheduler_client::SchedulerClient;
use jobcluster_proto::pb::worker_server::WorkerServer;
use jobcluster_proto::transport;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// How long open streams get to finish after the jobs have stopped.
const SERVER_DRAIN: Duration = Duration::from_secs(5);
/// Dialing the scheduler; registration retries after it.
const REGISTER_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long systemd's start waits for the first registration before the
/// worker says it is ready anyway.
const READY_WAIT: Duration = Duration::from_secs(10);

/// The daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("state directory {path}: {source}")]
    StateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tls: {0}")]
    Tls(#[from] jobcluster_pki::PkiError),
    #[error("listener: {0}")]
    Listener(#[source] std::io::Error),
    #[error("binding metrics.addr {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("scheduler.addr: {0}")]
    SchedulerAddr(#[source] transport::AddressError),
    #[error("grpc reflection: {0}")]
    Reflection(#[from] jobcluster_proto::grpc_ops::ReflectionError),
}

/// Runs the worker on `listener` until `shutdown` resolves, then stops
/// taking jobs, stops the running ones with their grace period, records
/// their final states and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let state_err = |source| Error::StateDir {
        path: config.state_dir.display().to_string(),
        source,
    };
    // Before any job runs: orphans of jobs come to workerd, not init, so
    // they stay within reach of stop and are reaped here.
    job::become_subreaper();
    let _reaper = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(job::reap_orphans()));
    let plugin_names: Vec<String> = config.plugins.keys().cloned().collect();
    let plugin_info: Vec<_> = config
        .plugins
        .values()
        .map(|p| jobcluster_proto::pb::PluginInfo {
            name: p.name.clone(),
            extensions: p.extensions.clone(),
        })
        .collect();
    let cgroups = match tokio::task::spawn_blocking(cgroup::Cgroups::setup).await {
        Ok(Ok(cgroups)) => {
            tracing::info!("job memory, CPU and process limits through a delegated cgroup v2");
            Some(cgroups)
        }
        Ok(Err(why)) => {
            tracing::info!(%why, "no delegated cgroup v2; job limits through setrlimit");
            None
        }
        Err(error) => {
            tracing::warn!(%error, "cgroup setup failed; job limits through setrlimit");
            None
        }
    };
    // Only a config that names root gets here (the default is nobody).
    for (name, run_as) in config.run_as.iter().filter(|(_, r)| r.uid == 0) {
        tracing::warn!(
            plugin = %name,
            user = %run_as.user,
            "jobs of this plugin run as root, as the config says: they can do anything on this machine, including reading the worker's key and rewriting its records"
        );
    }
    tokio::fs::create_dir_all(&config.state_dir)
        .await
        .map_err(state_err)?;
    // Job records and output logs are the worker's: jobs running as another
    // user must not read or rewrite them.
    tokio::fs::set_permissions(
        &config.state_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .await
    .map_err(state_err)?;
    let jobs = Arc::new(
        job::Jobs::open(
            &config.state_dir,
            config.scripts_dir.clone(),
            config.name.clone(),
            config.plugins,
            job::Policy {
                run_as: config.run_as.clone(),
                max_jobs: config.max_jobs,
                cgroups: cgroups.clone(),
            },
            membership::reported_until(&config.state_dir).await,
        )
        .await
        .map_err(state_err)?,
    );
    let metrics_server = match config.metrics_addr {
        Some(addr) => {
            let (metrics_listener, bound) = transport::bind(&addr.to_string())
                .await
                .map_err(|source| Error::Metrics { addr, source })?;
            if !bound.ip().is_loopback() {
                tracing::warn!(addr = %bound, "metrics.addr is not a loopback address: anyone who reaches it reads the metrics, without credentials");
            }
            tracing::info!(addr = %bound, "metrics server listening");
            let stop = CancellationToken::new();
            let server = tokio::spawn(metrics::serve(
                metrics_listener,
                jobs.clone(),
                config.max_jobs,
                stop.clone(),
            ));
            Some((server, stop))
        }
        None => None,
    };
    let local = listener.local_addr().map_err(Error::Listener)?;
    let advertise = config
        .advertise_addr
        .clone()
        .unwrap_or_else(|| local.to_string());
    let stop_server = CancellationToken::new();
    let (grpc_health, health_service) =
        jobcluster_proto::grpc_ops::health::<WorkerServer<service::WorkerService>>().await;
    let (reflection, reflection_v1alpha) = jobcluster_proto::grpc_ops::reflection()?;
    let routes = tonic::service::Routes::new(output_route::WorkerRoutes::new(
        service::WorkerService::new(jobs.clone(), config.tls.is_none()),
    ))
    .add_service(health_service)
    .add_service(reflection)
    .add_service(reflection_v1alpha);
    let stopped = stop_server.clone().cancelled_owned();
    let (scheduler, server, reloader) = match (&config.tls, &config.tls_files) {
        (Some(tls), Some(files)) => {
            let (client_tx, client_rx) = watch::channel(jobcluster_pki::client_config_for(
                &tls.roots,
                Some(&tls.identity),
                &[b"h2"],
                scheduler_peer(),
            )?);
            let scheduler = config
                .scheduler_addrs
                .iter()
                .map(|addr| {
                    transport::tls_channel_from(addr, client_rx.clone(), REGISTER_CONNECT_TIMEOUT)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(Error::SchedulerAddr)?;
            let server_config = jobcluster_pki::server_config(&tls.identity, &tls.roots, &[b"h2"])?;
            let (server_tx, server_rx) = watch::channel(server_config);
            let incoming = transport::tls_incoming(listener, server_rx);
            let server = tokio::spawn(transport::serve_grpc(incoming, routes, stopped));
            let (file, files, name) = (config.file.clone(), files.clone(), config.name.clone());
            let hangups = jobcluster_proto::daemon::hangups().map_err(Error::Listener)?;
            let reloader = tokio::spawn(jobcluster_proto::daemon::reload_on_hangup(
                hangups,
                move || {
                    let tls = config::TlsMaterial::load(&file, &files, &name)
                        .map_err(|e| e.to_string())?;
                    let text = |e: jobcluster_pki::PkiError| e.to_string();
                    let server = jobcluster_pki::server_config(&tls.identity, &tls.roots, &[b"h2"])
                        .map_err(text)?;
                    let client = jobcluster_pki::client_config_for(
                        &tls.roots,
                        Some(&tls.identity),
                        &[b"h2"],
                        scheduler_peer(),
                    )
                    .map_err(text)?;
                    server_tx.send_replace(server);
                    client_tx.send_replace(client);
                    Ok(())
                },
            ));
            (scheduler, server, Some(reloader))
        }
        _ => {
            let scheduler = config
                .scheduler_addrs
                .iter()
                .map(|addr| transport::plain_channel(addr, REGISTER_CONNECT_TIMEOUT))
                .collect::<Result<Vec<_>, _>>()
                .map_err(Error::SchedulerAddr)?;
            let incoming = transport::plain_incoming(listener);
            let server = tokio::spawn(transport::serve_grpc(incoming, routes, stopped));
            (scheduler, server, None)
        }
    };
    let membership = membership::Membership::new(
        scheduler
            .into_iter()
            .zip(&config.scheduler_addrs)
            .map(|(channel, addr)| (addr.clone(), SchedulerClient::new(channel)))
            .collect(),
        RegisterWorkerRequest {
            address: advertise,
            name: config.name.clone(),
            plugins: plugin_names,
            labels: config.labels.clone().into_iter().collect(),
            previous_worker_id: String::new(),
            instance_id: String::new(),
            jobs: Vec::new(),
            cgroup_limits: cgroups.is_some(),
            plugin_info,
            partial_report: false,
            max_jobs: config
                .max_jobs
                .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
        },
        &config.state_dir,
        jobs.clone(),
    );
    grpc_health.serving().await;
    tracing::info!(worker = %config.name, "worker ready");
    let ready = tokio::spawn(tell_systemd_ready(membership.registered()));
    let leave = CancellationToken::new();
    let member = {
        let membership = membership.clone();
        let cancel = leave.clone();
        tokio::spawn(async move { membership.run(cancel).await })
    };
    let retention = tokio::spawn(retention::run(
        jobs.clone(),
        config.retention,
        leave.clone(),
    ));
    let pending = tokio::spawn(write_pending(jobs.clone(), leave.clone()));

    shutdown.await;
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    ready.abort();
    jobcluster_proto::daemon::notify_stopping();
    // The server still answers while running jobs stop: health checkers
    // see the worker leave before its port closes.
    grpc_health.not_serving().await;
    tracing::info!("shutting down: no new jobs, stopping running ones");
    jobs.shutdown().await;
    leave.cancel();
    let _ = retention.await;
    let _ = pending.await;
    // One last try for final states the disk refused so far.
    jobs.write_pending().await;
    if let Ok(Some(worker_id)) = member.await {
        membership.leave(worker_id).await;
    }
    stop_server.cancel();
    match tokio::time::timeout(SERVER_DRAIN, server).await {
        Ok(Ok(())) => {}
        Ok(Err(join)) => tracing::error!(error = %join, "grpc server task failed"),
        Err(_) => tracing::warn!("open streams did not finish in time; closing them"),
    }
    if let Some((server, stop)) = metrics_server {
        stop.cancel();
        let _ = server.await;
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// Tells systemd (`Type=notify`) the worker is ready once the scheduler
/// has accepted it, so units ordered after it find it in the cluster. A
/// scheduler that is down must not fail the worker's start, though (it
/// serves its jobs and keeps trying), so after [`READY_WAIT`] it is ready
/// anyway.
async fn tell_systemd_ready(mut registered: watch::Receiver<bool>) {
    jobcluster_proto::daemon::notify_status("registering with the scheduler");
    match tokio::time::timeout(READY_WAIT, registered.wait_for(|r| *r)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return,
        Err(_) => tracing::warn!(
            waited = ?READY_WAIT,
            "not registered with the scheduler yet; serving anyway and still trying"
        ),
    }
    jobcluster_proto::daemon::notify_ready();
}

/// Housekeeping until `cancel` fires: retries writing the final records a
/// full or failing disk refused (their states are served and reported from
/// memory meanwhile; no event says the disk has room again), and lets old
/// finished jobs leave memory.
async fn write_pending(jobs: Arc<job::Jobs>, cancel: CancellationToken) {
    const EVERY: Duration = Duration::from_secs(2);
    loop {
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {
                jobs.write_pending().await;
                jobs.evict_finished();
            }
            () = cancel.cancelled() => return,
        }
    }
}

/// The worker dials only the scheduler's certificate.
fn scheduler_peer() -> jobcluster_pki::ExpectedPeer {
    jobcluster_pki::ExpectedPeer {
        role: jobcluster_pki::Role::Scheduler,
        name: None,
    }
}
