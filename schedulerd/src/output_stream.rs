//! A worker's output stream (`StreamJob`) read without tonic's decoding
//! copy.
//!
//! tonic's `Streaming` copies every received HTTP/2 DATA frame into a
//! buffer of its own, and then reserves a message's length again on top of
//! what it already holds, which copies the message a second time when the
//! frame carried it whole. The scheduler only passes a worker's output on
//! (to an HTTPS body, or a group's lines): here a message is decoded from
//! the frames that brought it, and its output (a `Bytes` field) is a slice
//! of the frame that holds it. A worker sends each output as a frame of
//! its own (`workerd`'s `output_route`), so that is usually the whole
//! frame; an output that flow control split across frames is copied.
//! Short frames are copied too, and at most [`MAX_HELD`] are held at once,
//! so what a stream keeps alive of h2's buffers is bounded however a peer
//! cuts its frames. Everything else keeps tonic's meaning: statuses come
//! from the response's headers or trailers with tonic's own parsing, and a
//! response that is not gRPC is read by tonic. Measured in
//! docs/PERFORMANCE.md ("Following: no copies in tonic").

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;

use bytes::{Buf, BufMut as _, Bytes, BytesMut};
use http_body::Body as _;
use jobcluster_proto::pb::{self, StreamJobRequest, StreamJobResponse};
use jobcluster_proto::transport::{
    GRPC_MAX_MESSAGE as MAX_MESSAGE, GRPC_PREFIX as HEADER, grpc_prefix,
};
use prost::Message as _;
use tonic::client::GrpcService;
use tonic::codec::Codec as _;
use tonic::codegen::http;
use tonic::{Code, Status};

/// A received frame at least this long may be held as it came (a slice
/// of h2's read buffer, which keeps that whole buffer alive); shorter ones
/// are copied. A worker's output frames are up to 256 KiB; its heads are
/// a few bytes.
const HOLD_FROM: usize = 16 * 1024;

/// The most received frames held as they came at once; others are copied.
/// A worker's message holds one (its output), two when flow control split
/// it. Bounds what one stream keeps alive of h2's buffers, however a peer
/// cuts its frames.
const MAX_HELD: usize = 2;

const PATH: &str = "/jobscheduler.Worker/StreamJob";

type ResponseBody = tonic::body::Body;

/// Calls `StreamJob` on `service` (a worker's channel) and returns its
/// stream once the worker answered with its headers.
pub(crate) async fn open<T>(mut service: T, request: StreamJobRequest) -> Result<Output, Status>
where
    T: GrpcService<tonic::body::Body, ResponseBody = ResponseBody>,
    T::Error: Into<tonic::codegen::StdError>,
{
    poll_fn(|cx| service.poll_ready(cx))
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let len = request.encoded_len();
    let prefix = grpc_prefix(len).ok_or_else(|| Status::internal("request too large to encode"))?;
    let mut frame = BytesMut::with_capacity(HEADER + len);
    frame.extend_from_slice(&prefix);
    request
        .encode(&mut frame)
        .map_err(|e| Status::internal(format!("encoding the request: {e}")))?;
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(PATH)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            frame.freeze(),
        )))
        .map_err(|e| Status::internal(format!("building the request: {e}")))?;
    let response = service
        .call(request)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let (parts, body) = response.into_parts();
    // A trailers-only answer: the status is in the headers, nothing follows.
    if let Some(status) = Status::from_header_map(&parts.headers) {
        if status.code() != Code::Ok {
            return Err(status);
        }
        return Ok(Output::ended(body));
    }
    let grpc = parts.status == http::StatusCode::OK
        && parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
    if !grpc {
        // Not gRPC (a proxy's page, a wrong port): tonic says what it was.
        let decoder =
            tonic_prost::ProstCodec::<StreamJobRequest, StreamJobResponse>::default().decoder();
        let mut stream = tonic::Streaming::new_response(decoder, body, parts.status, None, None);
        return Err(match stream.message().await {
            Err(status) => status,
            Ok(_) => Status::unknown(format!("HTTP {} without a gRPC status", parts.status)),
        });
    }
    Ok(Output {
        body,
        frames: Frames::default(),
        ended: false,
    })
}

/// A worker's `StreamJob` answer, read one message at a time.
#[derive(Debug)]
pub(crate) struct Output {
    body: ResponseBody,
    frames: Frames,
    ended: bool,
}

impl Output {
    fn ended(body: ResponseBody) -> Self {
        Output {
            body,
            frames: Frames::default(),
            ended: true,
        }
    }

    /// The next message; `None` once the worker ended the stream with an
    /// OK status. As tonic's `Streaming::message`.
    pub(crate) async fn message(&mut self) -> Result<Option<pb::StreamJobResponse>, Status> {
        loop {
            if let Some(message) = self.frames.take()? {
                return StreamJobResponse::decode(message)
                    .map(Some)
                    .map_err(|e| Status::internal(format!("decoding a message: {e}")));
            }
            if self.ended {
                return Ok(None);
            }
            let frame = match poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await {
                Some(Ok(frame)) => frame,
                Some(Err(status)) => {
                    self.ended = true;
                    return Err(status);
                }
                None => {
                    self.ended = true;
                    return Err(Status::unknown(
                        "the worker's stream ended without a gRPC status",
                    ));
                }
            };
            match frame.into_data() {
                Ok(data) => self.frames.push(data),
                Err(frame) => {
                    let Ok(trailers) = frame.into_trailers() else {
                        continue;
                    };
                    self.ended = true;
                    return match Status::from_header_map(&trailers) {
                        // The worker's error says more than a cut message.
                        Some(status) if status.code() != Code::Ok => Err(status),
                        _ if self.frames.has_remaining() => Err(Status::internal(
                            "the worker's stream ended inside a message",
                        )),
                        Some(_) => Ok(None),
                        None => Err(Status::unknown(
                            "the worker's stream ended without a gRPC status",
                        )),
                    };
                }
            }
        }
    }
}

/// Received frames, cut into messages: long frames held as they came (at
/// most [`MAX_HELD`]), the rest copied.
#[derive(Debug, Default)]
struct Frames {
    /// Received and not yet taken, none empty, in order; `tail` follows.
    segments: VecDeque<Segment>,
    /// Short frames (and long ones past [`MAX_HELD`]) copied, after
    /// `segments`.
    tail: BytesMut,
    /// Bytes in all.
    len: usize,
}

#[derive(Debug)]
struct Segment {
    bytes: Bytes,
    /// A received frame (or the rest of one), not a copy.
    held: bool,
}

impl Frames {
    fn has_remaining(&self) -> bool {
        self.len > 0
    }

    /// Of `segments`, those held as they came (a few at most: counted, not
    /// kept in step).
    fn held(&self) -> usize {
        self.segments.iter().filter(|s| s.held).count()
    }

    fn push(&mut self, data: Bytes) {
        self.len += data.len();
        if data.len() >= HOLD_FROM && self.held() < MAX_HELD {
            self.seal_tail();
            self.segments.push_back(Segment {
                bytes: data,
                held: true,
            });
        } else {
            self.tail.extend_from_slice(&data);
        }
    }

    /// Moves what `tail` holds into `segments`.
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            self.segments.push_back(Segment {
                bytes: self.tail.split().freeze(),
                held: false,
            });
        }
    }

    /// The next whole message, if received.
    fn take(&mut self) -> Result<Option<Segments>, Status> {
        if self.len < HEADER {
            return Ok(None);
        }
        let mut prefix = [0u8; HEADER];
        let mut filled = 0;
        let pieces = self.segments.iter().map(|s| &s.bytes[..]);
        for piece in pieces.chain(std::iter::once(&self.tail[..])) {
            let n = piece.len().min(HEADER - filled);
            prefix[filled..filled + n].copy_from_slice(&piece[..n]);
            filled += n;
            if filled == HEADER {
                break;
            }
        }
        if prefix[0] != 0 {
            // Never asked for: the scheduler accepts no compression.
            return Err(Status::internal(
                "protocol error: a compressed message on a stream without compression",
            ));
        }
        let len = usize::try_from(u32::from_be_bytes([
            prefix[1], prefix[2], prefix[3], prefix[4],
        ]))
        .unwrap_or(usize::MAX);
        if len > MAX_MESSAGE {
            return Err(Status::out_of_range(format!(
                "a message of {len} bytes from the worker, over the limit of {MAX_MESSAGE}"
            )));
        }
        if self.len < HEADER + len {
            return Ok(None);
        }
        self.seal_tail();
        self.split_off(HEADER);
        Ok(Some(self.split_off(len)))
    }

    /// The first `n` bytes of `segments` (they hold as many), as slices.
    fn split_off(&mut self, mut n: usize) -> Segments {
        let mut taken = Segments {
            segments: VecDeque::new(),
            remaining: n,
        };
        self.len -= n;
        while n > 0 {
            let Some(front) = self.segments.front_mut() else {
                break; // not reached: `take` sealed the tail
            };
            if front.bytes.len() > n {
                taken.segments.push_back(front.bytes.split_to(n));
                break;
            }
            n -= front.bytes.len();
            if let Some(whole) = self.segments.pop_front() {
                taken.segments.push_back(whole.bytes);
            }
        }
        taken
    }
}

/// One message's bytes as its frames brought them. Its `copy_to_bytes`,
/// which prost calls for a `Bytes` field, slices a frame instead of
/// copying when the field lies within one: a worker sends a message's
/// output field last, in a frame of its own.
#[derive(Debug)]
struct Segments {
    /// None empty.
    segments: VecDeque<Bytes>,
    remaining: usize,
}

impl Buf for Segments {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.segments.front().map_or(&[], |s| s)
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end of a message");
        self.remaining -= cnt;
        while cnt > 0 {
            let Some(front) = self.segments.front_mut() else {
                return;
            };
            if front.len() > cnt {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.segments.pop_front();
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(len <= self.remaining, "copy past the end of a message");
        if let Some(front) = self.segments.front_mut()
            && front.len() >= len
        {
            let bytes = front.split_to(len);
            if front.is_empty() {
                self.segments.pop_front();
            }
            self.remaining -= len;
            return bytes;
        }
        let mut copy = BytesMut::with_capacity(len);
        copy.put((&mut *self).take(len));
        copy.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message as tonic encodes it: one buffer, output first.
    fn message(output: &[u8]) -> Bytes {
        let msg = StreamJobResponse {
            output: Bytes::copy_from_slice(output),
            offset: 9,
            ..Default::default()
        };
        let mut out = vec![0u8];
        out.extend_from_slice(&(msg.encoded_len() as u32).to_be_bytes());
        msg.encode(&mut out).unwrap();
        Bytes::from(out)
    }

    fn outputs(frames: &mut Frames) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(message) = frames.take().unwrap() {
            let msg = StreamJobResponse::decode(message).unwrap();
            assert_eq!(msg.offset, 9);
            out.push(msg.output.to_vec());
        }
        out
    }

    fn within(inner: &Bytes, outer: &Bytes) -> bool {
        let (start, at) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
        at >= start && at + inner.len() <= start + outer.len()
    }

    #[test]
    fn a_message_whole_in_its_frame_is_a_slice_of_it() {
        let frame = message(&[7; HOLD_FROM]);
        let mut frames = Frames::default();
        frames.push(frame.clone());
        let output = StreamJobResponse::decode(frames.take().unwrap().unwrap())
            .unwrap()
            .output;
        assert_eq!(output.len(), HOLD_FROM);
        assert!(within(&output, &frame));
        assert!(!frames.has_remaining());
    }

    /// As a worker sends it: the prefix and the other fields, then the
    /// output's frame.
    #[test]
    fn an_output_in_a_frame_of_its_own_is_that_frame() {
        let output = Bytes::from(vec![3u8; 70_000]);
        let rest = StreamJobResponse {
            offset: 9,
            ..Default::default()
        };
        let mut head = BytesMut::new();
        let len = rest.encoded_len() + 1 + prost::length_delimiter_len(output.len()) + output.len();
        head.put_u8(0);
        head.put_u32(len as u32);
        rest.encode(&mut head).unwrap();
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut head);
        prost::encoding::encode_varint(output.len() as u64, &mut head);
        let mut frames = Frames::default();
        frames.push(head.freeze());
        assert!(frames.take().unwrap().is_none());
        frames.push(output.clone());
        let msg = StreamJobResponse::decode(frames.take().unwrap().unwrap()).unwrap();
        assert_eq!(msg.offset, 9);
        assert_eq!(msg.output, output);
        assert_eq!(msg.output.as_ptr(), output.as_ptr());
    }

    #[test]
    fn messages_split_anywhere_across_frames_come_out_whole_and_in_order() {
        let all: Vec<u8> = [
            message(b"one"),
            message(&[2; 3000]),
            message(b""),
            message(b"four"),
        ]
        .concat();
        for cut in 1..all.len() {
            for step in [1, 3, 700, all.len()] {
                let mut frames = Frames::default();
                let mut got = Vec::new();
                let mut rest = &all[..];
                let mut first = true;
                while !rest.is_empty() {
                    let n = if first { cut } else { step }.min(rest.len());
                    first = false;
                    frames.push(Bytes::copy_from_slice(&rest[..n]));
                    rest = &rest[n..];
                    got.extend(outputs(&mut frames));
                }
                assert_eq!(
                    got,
                    vec![b"one".to_vec(), vec![2; 3000], Vec::new(), b"four".to_vec()],
                    "cut {cut} step {step}"
                );
                assert!(!frames.has_remaining());
            }
        }
    }

    #[test]
    fn a_message_over_the_limit_is_refused_before_it_is_received() {
        let mut frames = Frames::default();
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&((MAX_MESSAGE + 1) as u32).to_be_bytes());
        frames.push(Bytes::from(prefix));
        let status = frames.take().unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange);
    }

    /// A peer cutting its frames small or long costs copies, never held
    /// frames past the bound.
    #[test]
    fn no_more_than_max_held_frames_are_held_however_frames_come() {
        let big = message(&[1; 3 * HOLD_FROM]);
        let mut frames = Frames::default();
        for byte in 0..big.len() {
            frames.push(big.slice(byte..byte + 1));
            assert!(frames.segments.is_empty());
        }
        assert_eq!(outputs(&mut frames), vec![vec![1; 3 * HOLD_FROM]]);
        let all: Vec<u8> = (0..4).flat_map(|_| big.to_vec()).collect();
        let all = Bytes::from(all);
        for piece in all.chunks(HOLD_FROM) {
            frames.push(all.slice_ref(piece));
            assert!(frames.held() <= MAX_HELD);
        }
        assert_eq!(outputs(&mut frames).len(), 4);
        assert_eq!((frames.held(), frames.len), (0, 0));
    }

    #[test]
    fn a_compressed_message_is_refused() {
        let mut frames = Frames::default();
        frames.push(Bytes::from_static(&[1, 0, 0, 0, 0]));
        assert_eq!(frames.take().unwrap_err().code(), Code::Internal);
    }
}
