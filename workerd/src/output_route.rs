//! The Worker gRPC service, with `StreamJob`'s messages sent without
//! tonic's encoding copy.
//!
//! tonic encodes every message into a buffer of its own, growing it by
//! reallocation: a job's output (up to 256 KiB a message) was copied once
//! or twice more there before TLS copies it into its records. Here
//! `StreamJob`'s handler is the generated trait's, unchanged, and each
//! message it yields goes out as two HTTP/2 DATA frames: gRPC's prefix
//! with every field but the output, and then the output's own bytes, its
//! field encoded last (protobuf decoders take fields in any order, and
//! gRPC lets a message span frames). The scheduler's relay decodes that
//! output as a slice of its frame (schedulerd's `output_stream`). Every
//! other call goes to the generated server.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use jobcluster_proto::pb::worker_server::{Worker, WorkerServer};
use jobcluster_proto::pb::{StreamJobRequest, StreamJobResponse};
use prost::Message as _;
use tokio_stream::Stream as _;
use tonic::Status;
use tonic::codec::Codec as _;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;

use jobcluster_proto::transport::{GRPC_MAX_MESSAGE, GRPC_PREFIX as HEADER, grpc_prefix};

use crate::service::{StreamItem, WorkerService};

const STREAM_JOB: &str = "/jobscheduler.Worker/StreamJob";

/// The Worker service's routes: `StreamJob` here, the rest generated.
#[derive(Clone)]
pub(crate) struct WorkerRoutes {
    service: Arc<WorkerService>,
    generated: WorkerServer<WorkerService>,
}

impl std::fmt::Debug for WorkerRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerRoutes").finish_non_exhaustive()
    }
}

impl WorkerRoutes {
    pub(crate) fn new(service: WorkerService) -> Self {
        let service = Arc::new(service);
        WorkerRoutes {
            generated: WorkerServer::from_arc(service.clone()),
            service,
        }
    }
}

impl NamedService for WorkerRoutes {
    const NAME: &'static str = <WorkerServer<WorkerService> as NamedService>::NAME;
}

impl Service<http::Request<tonic::body::Body>> for WorkerRoutes {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != STREAM_JOB {
            return self.generated.call(request);
        }
        let service = self.service.clone();
        Box::pin(async move {
            Ok(stream_job(&service, request)
                .await
                .unwrap_or_else(Status::into_http))
        })
    }
}

/// `StreamJob`, decoded and answered as tonic's server would, but for how
/// the messages are encoded.
async fn stream_job(
    service: &WorkerService,
    request: http::Request<tonic::body::Body>,
) -> Result<http::Response<tonic::body::Body>, Status> {
    let (parts, body) = request.into_parts();
    let decoder =
        tonic_prost::ProstCodec::<StreamJobResponse, StreamJobRequest>::default().decoder();
    let mut incoming = tonic::Streaming::new_request(decoder, body, None, Some(GRPC_MAX_MESSAGE));
    let message = incoming
        .message()
        .await?
        .ok_or_else(|| Status::internal("Missing request message."))?;
    let request = tonic::Request::from_parts(
        MetadataMap::from_headers(parts.headers),
        parts.extensions,
        message,
    );
    let (metadata, items, _) = Worker::stream_job(service, request).await?.into_parts();
    let mut response = http::Response::new(tonic::body::Body::new(Messages {
        items,
        output: None,
        done: false,
    }));
    *response.headers_mut() = metadata.into_headers();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

/// The response body: each message as its head and its output, then the
/// status in the trailers.
struct Messages {
    items: tokio_stream::wrappers::ReceiverStream<StreamItem>,
    /// The output of the message whose head went last.
    output: Option<Bytes>,
    done: bool,
}

impl http_body::Body for Messages {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(output) = self.output.take() {
            return Poll::Ready(Some(Ok(Frame::data(output))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let end = match ready!(Pin::new(&mut self.items).poll_next(cx)) {
            Some(Ok(message)) => match encode(message) {
                Ok((head, output)) => {
                    self.output = (!output.is_empty()).then_some(output);
                    return Poll::Ready(Some(Ok(Frame::data(head))));
                }
                Err(status) => status,
            },
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        if let Err(unsendable) = end.add_header(&mut trailers) {
            trailers.clear();
            // An internal status with an ASCII message always encodes.
            let _ = unsendable.add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.output.is_none()
    }
}

/// A message's head (gRPC's prefix, the fields but the output, the output
/// field's key and length) and its output, untouched.
fn encode(mut message: StreamJobResponse) -> Result<(Bytes, Bytes), Status> {
    let output = std::mem::take(&mut message.output);
    let rest = message.encoded_len();
    let field = if output.is_empty() {
        0
    } else {
        prost::encoding::key_len(1) + prost::length_delimiter_len(output.len()) + output.len()
    };
    let prefix = grpc_prefix(rest + field)
        .ok_or_else(|| Status::internal("an output message too large to send"))?;
    let mut head = BytesMut::with_capacity(HEADER + rest + field - output.len());
    head.extend_from_slice(&prefix);
    message
        .encode(&mut head)
        .map_err(|e| Status::internal(format!("encoding a message: {e}")))?;
    if !output.is_empty() {
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut head);
        prost::encoding::encode_varint(output.len() as u64, &mut head);
    }
    Ok((head.freeze(), output))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two parts, put together, decode as the message tonic would
    /// have sent.
    #[test]
    fn head_and_output_decode_as_the_message() {
        for output in [Vec::new(), b"x".to_vec(), vec![5; 300_000]] {
            let message = StreamJobResponse {
                output: Bytes::from(output),
                offset: 1 << 40,
                final_status: Some(Default::default()),
            };
            let (head, output) = encode(message.clone()).unwrap();
            let whole = [&head[..], &output[..]].concat();
            assert_eq!(whole[0], 0);
            let len = u32::from_be_bytes(whole[1..HEADER].try_into().unwrap()) as usize;
            assert_eq!(len, whole.len() - HEADER);
            assert_eq!(
                StreamJobResponse::decode(&whole[HEADER..]).unwrap(),
                message
            );
        }
    }
}
