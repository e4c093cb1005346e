//! Request bodies: memory accounting, size limits and Content-Encoding.
//!
//! Memory for bodies is bounded by `--max-inflight-bytes`, not by the number
//! of connections: a body's bytes are reserved (before reading when
//! Content-Length is known, frame by frame otherwise, and again while it is
//! decoded) and a request that cannot reserve gets 503 + Retry-After.

use std::io::Read;
use std::sync::Arc;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::http::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use bytes::Bytes;
use futures_util::FutureExt as _;
use http_body_util::BodyExt;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ApiError;
use crate::config::ByteSize;

/// Compressed bodies above this size are decoded on a blocking thread.
pub(crate) const DECODE_INLINE_MAX_BYTES: usize = 64 * 1024;
/// Growth step of a decoded body (each step is reserved first).
const DECODE_STEP_BYTES: usize = 256 * 1024;

/// The in-flight byte budget shared by every request.
#[derive(Debug, Clone)]
pub struct Inflight {
    sem: Arc<Semaphore>,
    limit: u64,
    gauge: Gauge,
}

/// Bytes reserved for one request; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    bytes: u64,
    budget: Inflight,
}

impl Inflight {
    /// A budget of `limit` bytes, reported through `gauge`.
    pub fn new(limit: u64, gauge: Gauge) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(
                limit.min(Semaphore::MAX_PERMITS as u64) as usize
            )),
            limit,
            gauge,
        }
    }

    /// An empty reservation to grow.
    pub fn reservation(&self) -> Reservation {
        Reservation {
            permit: None,
            bytes: 0,
            budget: self.clone(),
        }
    }
}

impl Reservation {
    /// The bytes it holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Reserves `n` more bytes or answers 503.
    pub fn grow(&mut self, n: u64) -> Result<(), ApiError> {
        if n == 0 {
            return Ok(());
        }
        let permits = u32::try_from(n).map_err(|_| self.overloaded())?;
        let more = self
            .budget
            .sem
            .clone()
            .try_acquire_many_owned(permits)
            .map_err(|_| self.overloaded())?;
        match &mut self.permit {
            Some(p) => p.merge(more),
            None => self.permit = Some(more),
        }
        self.bytes += n;
        self.budget.gauge.inc_by(n as i64);
        Ok(())
    }

    fn overloaded(&self) -> ApiError {
        ApiError::Overloaded(format!(
            "the node is at its limit of {} of request bodies in memory (--max-inflight-bytes); retry later",
            ByteSize(self.budget.limit)
        ))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.gauge.dec_by(self.bytes as i64);
    }
}

/// Content-Encoding of a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// No encoding.
    Identity,
    /// gzip (RFC 1952), several members allowed.
    Gzip,
    /// HTTP `deflate`: zlib (RFC 1950).
    Deflate,
    /// zstd.
    Zstd,
}

/// Reads Content-Encoding; 415 for anything unknown.
pub fn encoding(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    let Some(v) = headers.get(CONTENT_ENCODING) else {
        return Ok(Encoding::Identity);
    };
    let v = v.to_str().unwrap_or("").trim().to_ascii_lowercase();
    match v.as_str() {
        "" | "identity" => Ok(Encoding::Identity),
        "gzip" | "x-gzip" => Ok(Encoding::Gzip),
        "deflate" => Ok(Encoding::Deflate),
        "zstd" => Ok(Encoding::Zstd),
        _ => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Encoding {v:?} is not supported; use gzip, deflate, zstd or none"
        ))),
    }
}

/// The `Content-Type` as sent, and its media type without parameters
/// (empty when absent or not text).
pub fn content_type(headers: &HeaderMap) -> (&str, &str) {
    let ct = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    (ct, ct.split(';').next().unwrap_or("").trim())
}

fn too_large(max: u64) -> ApiError {
    ApiError::TooLarge(format!(
        "the request body is larger than the limit of {} (--max-body-bytes)",
        ByteSize(max)
    ))
}

/// A request body as it arrived: the frames the HTTP layer handed over,
/// not copied into one buffer. The storage writes them with one vectored
/// write, so a large body costs its own size in memory, once. Frames
/// smaller than [`SMALL_FRAME_BYTES`] (a chunked body sent a few bytes at a
/// time) are copied together instead, so that what a body costs beyond its
/// bytes, and the number of buffers the write takes, stay bounded.
#[derive(Debug, Default)]
pub struct Frames {
    parts: Vec<Bytes>,
    /// Small frames gathered, after `parts`.
    tail: Vec<u8>,
    len: usize,
}

/// Frames below this size are gathered into one buffer.
pub const SMALL_FRAME_BYTES: usize = 4096;

impl Frames {
    /// The body held in one buffer.
    pub fn from_vec(v: Vec<u8>) -> Self {
        let mut f = Frames::default();
        f.push(Bytes::from(v));
        f
    }

    /// Adds a frame at the end.
    pub fn push(&mut self, b: Bytes) {
        self.len += b.len();
        if b.len() < SMALL_FRAME_BYTES {
            self.tail.extend_from_slice(&b);
            if self.tail.len() >= SMALL_FRAME_BYTES {
                self.flush_tail();
            }
        } else {
            self.flush_tail();
            self.parts.push(b);
        }
    }

    fn flush_tail(&mut self) {
        if !self.tail.is_empty() {
            self.parts.push(Bytes::from(std::mem::take(&mut self.tail)));
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffers, in order.
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.parts
            .iter()
            .map(|p| &p[..])
            .chain((!self.tail.is_empty()).then_some(&self.tail[..]))
    }

    /// The buffers, in order.
    pub fn into_parts(mut self) -> Vec<Bytes> {
        self.flush_tail();
        self.parts
    }

    /// The bytes, in order.
    pub fn bytes(&self) -> impl Iterator<Item = u8> + '_ {
        self.chunks().flat_map(|p| p.iter().copied())
    }

    /// The last byte, if any.
    pub fn last(&self) -> Option<u8> {
        self.chunks().last().and_then(|p| p.last().copied())
    }

    /// The body in one buffer (a copy unless it is one buffer already).
    pub fn into_contiguous(self) -> Bytes {
        let mut parts = self.into_parts();
        match parts.len() {
            0 => Bytes::new(),
            1 => parts.pop().unwrap_or_default(),
            _ => {
                let mut buf = Vec::with_capacity(parts.iter().map(Bytes::len).sum());
                for p in &parts {
                    buf.extend_from_slice(p);
                }
                Bytes::from(buf)
            }
        }
    }
}

/// `work(body)`: inline for a small body, on the blocking pool for a
/// larger one, so that work proportional to a large body stays off the
/// threads that serve requests. `what` names the work in the 500 of a
/// task that failed.
pub async fn off_runtime_if_large<T: Send + 'static>(
    body: Bytes,
    what: &str,
    work: impl FnOnce(&[u8]) -> T + Send + 'static,
) -> Result<T, ApiError> {
    if body.len() <= DECODE_INLINE_MAX_BYTES {
        return Ok(work(&body));
    }
    tokio::task::spawn_blocking(move || work(&body))
        .await
        .map_err(|e| ApiError::Internal(format!("{what} task failed: {e}")))
}

/// Reads the whole body, at most `max` bytes, reserving memory as it goes
/// (and one byte more, for a final newline the body may lack).
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    max: u64,
    timeout: std::time::Duration,
    res: &mut Reservation,
) -> Result<Frames, ApiError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared
        && len > max
    {
        return Err(too_large(max));
    }
    // Memory and budget are taken as bytes arrive, so that a slow sender
    // holds what it sent, not what it promised; the frames are kept as
    // received.
    let mut frames = Frames::default();
    let mut body = body;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // A frame already received (a small body comes with its head, and
        // so does its end) is taken without making a timer.
        let next = match body.frame().now_or_never() {
            Some(next) => next,
            None => tokio::time::timeout_at(deadline, body.frame())
                .await
                .map_err(|_| {
                    ApiError::RequestTimeout(format!(
                        "the request body did not arrive within {} (--request-timeout); nothing was written",
                        humantime::format_duration(timeout)
                    ))
                })?,
        };
        let Some(frame) = next else {
            break;
        };
        let frame = frame.map_err(|e| {
            ApiError::BadRequest(format!("the request body could not be read: {e}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let new_len = (frames.len() + data.len()) as u64;
        if new_len > max {
            return Err(too_large(max));
        }
        if new_len + 1 > res.bytes {
            res.grow(new_len + 1 - res.bytes)?;
        }
        frames.push(data);
    }
    Ok(frames)
}

/// Decodes `raw` per `enc`, at most `max` decoded bytes, reserving memory as
/// it grows. 415 when the body does not decode, 413 when it is too large.
pub async fn decode(
    enc: Encoding,
    raw: Frames,
    max: u64,
    res: &mut Reservation,
) -> Result<Frames, ApiError> {
    if enc == Encoding::Identity {
        return Ok(raw);
    }
    let raw = raw.into_contiguous();
    if raw.len() <= DECODE_INLINE_MAX_BYTES {
        return decode_blocking(enc, &raw, max, res).map(Frames::from_vec);
    }
    // The reservation moves to the blocking thread and back.
    let mut moved = std::mem::replace(res, res.budget.reservation());
    let (out, moved) = tokio::task::spawn_blocking(move || {
        let out = decode_blocking(enc, &raw, max, &mut moved);
        (out, moved)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("decoding task failed: {e}")))?;
    *res = moved;
    out.map(Frames::from_vec)
}

pub(crate) fn decode_blocking(
    enc: Encoding,
    raw: &[u8],
    max: u64,
    res: &mut Reservation,
) -> Result<Vec<u8>, ApiError> {
    let name = match enc {
        Encoding::Gzip => "gzip",
        Encoding::Deflate => "deflate (zlib)",
        Encoding::Zstd => "zstd",
        Encoding::Identity => "identity",
    };
    let bad = |e: std::io::Error| {
        ApiError::UnsupportedMediaType(format!("the body is not valid {name} data: {e}"))
    };
    let mut reader: Box<dyn Read + '_> = match enc {
        Encoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(raw)),
        Encoding::Deflate => Box::new(flate2::read::ZlibDecoder::new(raw)),
        Encoding::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(raw).map_err(bad)?),
        Encoding::Identity => Box::new(raw),
    };
    let mut out: Vec<u8> = Vec::new();
    loop {
        if out.len() == out.capacity() {
            let step = DECODE_STEP_BYTES
                .min((max + 1 - out.len() as u64) as usize)
                .max(1);
            res.grow(step as u64)?;
            out.reserve_exact(step);
        }
        let len = out.len();
        out.resize(out.capacity(), 0);
        let n = match reader.read(&mut out[len..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(bad(e)),
        };
        out.truncate(len + n);
        if out.len() as u64 > max {
            return Err(too_large(max));
        }
        if n == 0 {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn budget(limit: u64) -> Inflight {
        Inflight::new(limit, Gauge::default())
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn small_frames_are_gathered_and_large_ones_kept() {
        let mut f = Frames::default();
        let mut want = Vec::new();
        for i in 0..100_000u32 {
            let b = [(i % 251) as u8];
            want.extend_from_slice(&b);
            f.push(Bytes::copy_from_slice(&b));
        }
        let big = Bytes::from(vec![7u8; 3 * SMALL_FRAME_BYTES]);
        want.extend_from_slice(&big);
        f.push(big.clone());
        f.push(Bytes::from_static(b"\n"));
        want.push(b'\n');
        assert_eq!(f.len(), want.len());
        assert_eq!(f.last(), Some(b'\n'));
        assert_eq!(f.bytes().collect::<Vec<u8>>(), want);
        let parts = f.into_parts();
        // One buffer per 4 KiB of one-byte frames, the large frame as it
        // came (not copied), the final newline.
        assert!(
            parts.len() <= 100_000 / SMALL_FRAME_BYTES + 3,
            "{}",
            parts.len()
        );
        assert!(parts.iter().any(|p| p.as_ptr() == big.as_ptr()));
        assert_eq!(parts.concat(), want);
    }

    #[test]
    fn decodes_every_encoding() {
        let plain = b"a\nb\n".repeat(100_000);
        let inflight = budget(1 << 30);
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        zlib.write_all(&plain).unwrap();
        let cases = [
            (Encoding::Gzip, gzip(&plain)),
            (Encoding::Deflate, zlib.finish().unwrap()),
            (Encoding::Zstd, zstd::encode_all(&plain[..], 1).unwrap()),
        ];
        for (enc, raw) in cases {
            let mut res = inflight.reservation();
            let out = decode_blocking(enc, &raw, 1 << 30, &mut res).unwrap();
            assert_eq!(&out[..], &plain[..], "{enc:?}");
        }
    }

    #[test]
    fn limits_apply_to_the_decoded_size() {
        let raw = gzip(&vec![b'x'; 1 << 20]);
        let mut res = budget(1 << 30).reservation();
        let err = decode_blocking(Encoding::Gzip, &raw, 1000, &mut res).unwrap_err();
        assert!(matches!(err, ApiError::TooLarge(_)), "{err}");
        // A small budget is a 503, not a 413.
        let mut res = budget(100_000).reservation();
        let err = decode_blocking(Encoding::Gzip, &raw, 1 << 30, &mut res).unwrap_err();
        assert!(matches!(err, ApiError::Overloaded(_)), "{err}");
    }

    #[test]
    fn garbage_is_415() {
        let mut res = budget(1 << 20).reservation();
        for enc in [Encoding::Gzip, Encoding::Deflate, Encoding::Zstd] {
            let err = decode_blocking(enc, b"not compressed", 1 << 20, &mut res).unwrap_err();
            assert!(
                matches!(err, ApiError::UnsupportedMediaType(_)),
                "{enc:?}: {err}"
            );
        }
    }

    #[test]
    fn reservations_are_released() {
        let inflight = budget(100);
        let mut a = inflight.reservation();
        a.grow(80).unwrap();
        let mut b = inflight.reservation();
        assert!(matches!(b.grow(30), Err(ApiError::Overloaded(_))));
        drop(a);
        b.grow(100).unwrap();
        assert_eq!(inflight.gauge.get(), 100);
        drop(b);
        assert_eq!(inflight.gauge.get(), 0);
    }
}
