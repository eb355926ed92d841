//! Workers the tests serve in their own process (`seed`,
//! `hostile_worker`): a hand-written `jobscheduler.Worker` service routed
//! by path ([`Routes`]), served on a loopback port ([`Served`]), unary
//! answers from plain closures ([`unary`]), and a scheduler in insecure
//! mode to join ([`insecure_scheduler`], [`call_scheduler`],
//! [`plain_http`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic_prost::ProstCodec;

use crate::cluster::bin;
use crate::harness::Daemon;

/// How a hand-written worker answers each call.
pub trait Routes: Clone + Send + Sync + 'static {
    fn route(&self, request: http::Request<Body>) -> BoxFuture<http::Response<Body>, Infallible>;
}

/// The `jobscheduler.Worker` service whose calls go to `R`.
#[derive(Clone)]
struct WorkerService<R>(R);

impl<R> tonic::server::NamedService for WorkerService<R> {
    const NAME: &'static str = "jobscheduler.Worker";
}

impl<R: Routes> Service<http::Request<Body>> for WorkerService<R> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        self.0.route(request)
    }
}

/// A worker served on a loopback port of its own until killed or dropped.
pub struct Served<R> {
    pub worker: R,
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl<R: Routes> Served<R> {
    pub async fn start(worker: R) -> Served<R> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn({
            let service = WorkerService(worker.clone());
            async move {
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await
                    .unwrap();
            }
        });
        Served {
            worker,
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// The worker is gone: its listener closed and its connections ended.
    pub async fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("the worker's server stops")
            .unwrap();
    }
}

impl<R> Drop for Served<R> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A unary call to the gRPC port of a scheduler in insecure mode.
pub async fn call_scheduler<Req, Res>(scheduler: &str, path: &'static str, request: Req) -> Res
where
    Req: prost::Message + Send + Sync + 'static,
    Res: prost::Message + Default + Send + Sync + 'static,
{
    let channel = tonic::transport::Channel::from_shared(format!("http://{scheduler}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(request),
        http::uri::PathAndQuery::from_static(path),
        ProstCodec::<Req, Res>::default(),
    )
    .await
    .unwrap()
    .into_inner()
}

struct Handler<Req, Res>(Arc<dyn Fn(Req) -> Result<Res, Status> + Send + Sync>);

impl<Req: Send + 'static, Res: Send + 'static> tonic::server::UnaryService<Req>
    for Handler<Req, Res>
{
    type Response = Res;
    type Future = BoxFuture<tonic::Response<Res>, Status>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        let result = (self.0)(request.into_inner()).map(tonic::Response::new);
        Box::pin(std::future::ready(result))
    }
}

pub async fn unary<Req, Res>(
    request: http::Request<Body>,
    f: impl Fn(Req) -> Result<Res, Status> + Send + Sync + 'static,
) -> http::Response<Body>
where
    Req: prost::Message + Default + Send + 'static,
    Res: prost::Message + Send + 'static,
{
    let mut grpc = tonic::server::Grpc::new(ProstCodec::<Res, Req>::default());
    grpc.unary(Handler(Arc::new(f)), request).await
}

/// A scheduler in insecure mode on loopback ports, its store in the
/// returned directory, with `workers` as its `[workers]` section. Always
/// SQLite, also in the suite's PostgreSQL pass: these tests are about what
/// a worker says, not the store.
pub fn insecure_scheduler(workers: &str) -> (Daemon, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("s.toml"),
        format!(
            "[grpc_server]\naddr = \"127.0.0.1:0\"\nuse_tls = false\ninsecure = true\n\
             [http_server]\naddr = \"127.0.0.1:0\"\n[store]\npath = \"{}\"\n\
             [workers]\n{workers}",
            tmp.path().join("s.db").display(),
        ),
    )
    .unwrap();
    let scheduler = Daemon::spawn_with(
        &bin("schedulerd"),
        &["--config", tmp.path().join("s.toml").to_str().unwrap()],
        &["grpc", "http"],
        &[],
    );
    (scheduler, tmp)
}

/// `clusterctl` for an insecure scheduler's API at `url`, with no PKI.
pub fn plain_clusterctl(url: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(bin("clusterctl"));
    command
        .env("CLUSTERCTL_SCHEDULER", url)
        .env_remove("CLUSTERCTL_CA")
        .env_remove("CLUSTERCTL_CERT")
        .env_remove("CLUSTERCTL_KEY");
    command
}

/// An HTTP client for an insecure scheduler's API.
pub fn plain_http() -> reqwest::Client {
    // Plain HTTP, but reqwest is built without a provider of its own.
    jobcluster_pki::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}
