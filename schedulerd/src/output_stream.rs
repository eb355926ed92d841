//! A worker's output stream (`StreamJob`) read without tonic's decoding
//! copy.
//!
//! tonic's `Streaming` copies every received HTTP/2 DATA frame into a
//! buffer of its own, and then reserves a message's length again on top of
//! what it already holds, which copies the message a second time when the
//! frame carried it whole. The scheduler only passes a worker's output on
//! (to an HTTPS body, or a group's lines): here a message is decoded from
//! the frames that brought it, and its output is left in them, as slices
//! of the frames that hold it. A worker sends each output as a frame of
//! its own (`workerd`'s `output_route`), so that is usually the whole
//! frame, or two where flow control split it; the body it goes on in gets
//! a frame per slice. Short frames are copied, and at most [`MAX_HELD`]
//! are held at once, so what a stream keeps alive of h2's buffers is
//! bounded however a peer cuts its frames. Everything else keeps tonic's
//! meaning: statuses come from the response's headers or trailers with
//! tonic's own parsing, and a response that is not gRPC is read by tonic.
//! Measured in docs/PERFORMANCE.md ("Following: no copies in tonic", and
//! "Following: a split output passed on, not copied").

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
    /// OK status. As tonic's `Streaming::message`, with the output left in
    /// the frames that brought it.
    pub(crate) async fn message(&mut self) -> Result<Option<Message>, Status> {
        loop {
            if let Some(message) = self.frames.take()? {
                return Message::decode(message)
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
    fn split_off(&mut self, n: usize) -> Segments {
        self.len -= n;
        Segments {
            segments: split_front(&mut self.segments, n),
            remaining: n,
        }
    }
}

/// A piece of received bytes in a queue.
trait Piece {
    fn bytes(&mut self) -> &mut Bytes;
}

impl Piece for Segment {
    fn bytes(&mut self) -> &mut Bytes {
        &mut self.bytes
    }
}

impl Piece for Bytes {
    fn bytes(&mut self) -> &mut Bytes {
        self
    }
}

/// Takes the first `n` bytes off `queue` (it holds as many), as slices of
/// its pieces, in order; none empty.
fn split_front<T: Piece>(queue: &mut VecDeque<T>, mut n: usize) -> VecDeque<Bytes> {
    let mut taken = VecDeque::new();
    while n > 0 {
        let Some(front) = queue.front_mut().map(Piece::bytes) else {
            break; // not reached: the caller counted
        };
        if front.len() > n {
            taken.push_back(front.split_to(n));
            break;
        }
        n -= front.len();
        taken.extend(
            queue
                .pop_front()
                .map(|mut whole| std::mem::take(whole.bytes())),
        );
    }
    taken
}

/// A message from a worker: its output as the frames brought it, and the
/// fields the scheduler reads.
#[derive(Debug)]
pub(crate) struct Message {
    /// The output in order, none empty: one slice of a frame, or several
    /// where flow control split the output across frames (a few at most:
    /// [`Frames`] holds few).
    pub(crate) output: VecDeque<Bytes>,
    pub(crate) final_status: Option<pb::QueryJobResponse>,
}

impl Message {
    /// Decodes a message, leaving its output in the frames that brought
    /// it. prost would make the output one `Bytes`, copying it whenever
    /// flow control split it: in a replay a quarter of the 256 KiB outputs
    /// came in two frames (the sender's window runs out mid-message once
    /// in every window update, measured). The other fields, a few bytes,
    /// are copied and decoded by prost. Walking the fields uses
    /// `prost::encoding`, which prost's generated code calls, so it stays
    /// as long as the generated code of this prost version works.
    fn decode(mut message: Segments) -> Result<Message, prost::DecodeError> {
        use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
        const OUTPUT: u32 = 1;
        let mut output = VecDeque::new();
        let mut head = BytesMut::new();
        while message.has_remaining() {
            let mut field = message.clone();
            let (tag, wire_type) = decode_key(&mut message)?;
            if tag == OUTPUT && wire_type == WireType::LengthDelimited {
                // prost's own check of the length, and its error.
                skip_field(
                    wire_type,
                    tag,
                    &mut message.clone(),
                    DecodeContext::default(),
                )?;
                let len = usize::try_from(decode_varint(&mut message)?)
                    .map_or(message.remaining(), |len| len.min(message.remaining()));
                // The last one wins, as prost merges a repeated scalar.
                output = message.split_pieces(len);
            } else {
                skip_field(wire_type, tag, &mut message, DecodeContext::default())?;
                let len = field.remaining() - message.remaining();
                head.put((&mut field).take(len));
            }
        }
        let head = StreamJobResponse::decode(head)?;
        Ok(Message {
            output,
            final_status: head.final_status,
        })
    }

    /// The output's length in bytes.
    pub(crate) fn output_len(&self) -> usize {
        self.output.iter().map(Bytes::len).sum()
    }
}

/// One message's bytes as its frames brought them.
#[derive(Debug, Clone)]
struct Segments {
    /// None empty.
    segments: VecDeque<Bytes>,
    remaining: usize,
}

impl Segments {
    /// The next `len` bytes (there are as many), as slices.
    fn split_pieces(&mut self, len: usize) -> VecDeque<Bytes> {
        self.remaining -= len;
        split_front(&mut self.segments, len)
    }
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
            let msg = Message::decode(message).unwrap();
            assert!(msg.output.iter().all(|chunk| !chunk.is_empty()));
            out.push(joined(&msg.output));
        }
        out
    }

    fn joined(output: &VecDeque<Bytes>) -> Vec<u8> {
        output
            .iter()
            .flat_map(|chunk| chunk.iter().copied())
            .collect()
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
        let output = Message::decode(frames.take().unwrap().unwrap())
            .unwrap()
            .output;
        assert_eq!(output.len(), 1);
        assert_eq!(output[0].len(), HOLD_FROM);
        assert!(within(&output[0], &frame));
        assert!(!frames.has_remaining());
    }

    /// As a worker sends it: the prefix and the other fields, then the
    /// output's frame: the output is that frame; split by flow control, it
    /// is the two frames' slices, not a copy.
    #[test]
    fn an_output_in_frames_of_its_own_is_those_frames() {
        let output = Bytes::from(vec![3u8; 70_000]);
        let rest = StreamJobResponse {
            offset: 9,
            final_status: Some(pb::QueryJobResponse {
                done: true,
                exit_code: Some(3),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut head = BytesMut::new();
        let len = rest.encoded_len() + 1 + prost::length_delimiter_len(output.len()) + output.len();
        head.put_u8(0);
        head.put_u32(len as u32);
        rest.encode(&mut head).unwrap();
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut head);
        prost::encoding::encode_varint(output.len() as u64, &mut head);
        let head = head.freeze();
        // Whole; split in two long frames; split as measured, a short
        // second frame (copied with the frames after it).
        for cut in [output.len(), 40_000, HOLD_FROM, output.len() - 112] {
            let mut frames = Frames::default();
            frames.push(head.clone());
            assert!(frames.take().unwrap().is_none());
            frames.push(output.slice(..cut));
            if cut < output.len() {
                assert!(frames.take().unwrap().is_none());
                frames.push(output.slice(cut..));
            }
            let msg = Message::decode(frames.take().unwrap().unwrap()).unwrap();
            assert_eq!(msg.final_status, rest.final_status);
            assert_eq!(joined(&msg.output), output);
            assert_eq!(msg.output[0].as_ptr(), output.as_ptr(), "cut {cut}");
            if cut < output.len() {
                assert_eq!(msg.output.len(), 2);
                let held = output.len() - cut >= HOLD_FROM;
                assert_eq!(within(&msg.output[1], &output), held, "cut {cut}");
            }
        }
    }

    /// prost's meaning where another encoder could differ: the output
    /// first, a field unknown to the scheduler skipped, the output given
    /// twice (the last one counts), a length past the message refused;
    /// and the same whichever way the message is cut into segments.
    #[test]
    fn a_message_is_read_as_prost_reads_it() {
        let mut body = BytesMut::new();
        body.extend_from_slice(
            &StreamJobResponse {
                output: Bytes::from_static(b"first"),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        prost::encoding::encode_key(9, prost::encoding::WireType::SixtyFourBit, &mut body);
        body.put_u64_le(7);
        let status = pb::QueryJobResponse {
            done: true,
            error_text: "exited with code 3".into(),
            exit_code: Some(3),
            ..Default::default()
        };
        body.extend_from_slice(
            &StreamJobResponse {
                offset: 300,
                output: Bytes::from(vec![b'x'; 200]),
                final_status: Some(status.clone()),
            }
            .encode_to_vec(),
        );
        let body = body.freeze();
        let segments = |body: &[u8]| Segments {
            segments: VecDeque::from([Bytes::copy_from_slice(body)]),
            remaining: body.len(),
        };
        let prosts = StreamJobResponse::decode(body.clone()).unwrap();
        assert_eq!(prosts.output, vec![b'x'; 200]);
        for step in [1, 2, 3, 7, body.len()] {
            let cut = Segments {
                segments: body.chunks(step).map(|c| body.slice_ref(c)).collect(),
                remaining: body.len(),
            };
            let msg = Message::decode(cut).unwrap();
            assert_eq!(joined(&msg.output), prosts.output, "step {step}");
            assert_eq!(msg.final_status.as_ref(), Some(&status), "step {step}");
        }
        // The output last, its length one past the message's end.
        let mut cut = BytesMut::new();
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut cut);
        prost::encoding::encode_varint(4, &mut cut);
        cut.extend_from_slice(b"abc");
        let ours = Message::decode(segments(&cut)).unwrap_err().to_string();
        let prosts = StreamJobResponse::decode(&cut[..]).unwrap_err().to_string();
        assert!(ours.ends_with("buffer underflow"), "{ours}");
        assert!(prosts.ends_with("buffer underflow"), "{prosts}");
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
