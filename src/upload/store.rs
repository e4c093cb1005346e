//! The object store: the few S3 operations chunkbus needs, with settings
//! every S3-compatible store accepts.
//!
//! Integrity: by default each PUT and each part carries `Content-MD5`, which
//! AWS S3, MinIO, RustFS, Ceph RGW, moto and s3s all verify; the SDK's
//! newer flexible checksums (aws-chunked bodies with trailers) are not sent
//! unless `--s3-checksum crc32c` asks for them. Bodies are sent from memory
//! (one part at a time), never streamed, so no store sees `aws-chunked`.

use std::time::{Duration, SystemTime};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;

use crate::storage::numbering::LineRecord;
use md5::{Digest, Md5};

use super::{ChecksumMode, S3Config};

/// Content type of every chunk object.
pub const CONTENT_TYPE: &str = "application/x-ndjson";

/// An S3 failure, classified for retries and for the operator.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct S3Error {
    /// What went wrong, in a sentence that names the operation.
    pub message: String,
    /// The class of failure.
    pub kind: S3ErrorKind,
}

/// Classes of [`S3Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3ErrorKind {
    /// The object (or multipart upload) does not exist.
    NotFound,
    /// The store refused the credentials or the request's permissions.
    Auth,
    /// The bucket does not exist.
    NoBucket,
    /// Anything else: network, timeouts, 5xx, throttling.
    Other,
    /// This chunk cannot be uploaded for a reason of its own (its local
    /// copy cannot be read, its key holds another object); others can.
    Chunk,
    /// A conditional write's condition did not hold: a write that only
    /// creates found an object under its key, or one that replaces an
    /// object found another (or none).
    Exists,
    /// The store does not implement the request as sent (HTTP 501): a
    /// conditional overwrite (`If-Match`) on a store without it.
    Unsupported,
}

/// What a write requires of the object under its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition<'a> {
    /// None there (`If-None-Match: *`): a chunk upload never overwrites.
    Absent,
    /// The object of this entity tag there (`If-Match`): it is replaced in
    /// one step, never deleted first, and only as it was looked at.
    Matches(&'a str),
}

/// What a lookup of an object tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectHead {
    /// Bytes.
    pub size: u64,
    /// The line numbers its metadata holds (uploaded with them).
    pub numbers: Option<LineRecord>,
    /// Its entity tag, for a conditional overwrite.
    pub etag: Option<String>,
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Full key.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// Last modification, in milliseconds since the Unix epoch.
    pub modified_ms: u64,
}

/// A configured S3 client for one bucket.
#[derive(Debug, Clone)]
pub struct ObjectStore {
    client: Client,
    bucket: String,
    checksum: ChecksumMode,
}

fn classify<E>(what: &str, err: SdkError<E, HttpResponse>) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_owned);
    let kind = match (code.as_deref(), status) {
        (Some("PreconditionFailed"), _) | (_, Some(412)) => S3ErrorKind::Exists,
        (Some("NotImplemented"), _) | (_, Some(501)) => S3ErrorKind::Unsupported,
        (Some("NoSuchBucket"), _) => S3ErrorKind::NoBucket,
        (Some("NoSuchKey" | "NoSuchUpload" | "NotFound"), _) => S3ErrorKind::NotFound,
        (
            Some(
                "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "AccessDenied"
                | "ExpiredToken"
                | "InvalidToken"
                | "InvalidClientTokenId",
            ),
            _,
        )
        | (_, Some(401 | 403)) => S3ErrorKind::Auth,
        (_, Some(404)) => S3ErrorKind::NotFound,
        _ => S3ErrorKind::Other,
    };
    let detail = match (&code, err.message()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.clone(),
        _ => match status {
            Some(s @ (401 | 403)) => {
                format!("HTTP {s}: access denied (bad credentials or missing permission)")
            }
            Some(404) => "HTTP 404: not found".to_owned(),
            Some(s) => format!("HTTP {s}"),
            None => DisplayErrorContext(&err).to_string(),
        },
    };
    S3Error {
        message: format!("{what}: {detail}"),
        kind,
    }
}

fn md5_base64(data: &[u8]) -> String {
    aws_smithy_types::base64::encode(Md5::digest(data))
}

impl ObjectStore {
    /// Builds a client from the standard AWS configuration chain
    /// (environment, profile, instance role), overridden by `cfg`.
    pub async fn connect(cfg: &S3Config) -> Self {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(120))
                    .build(),
            );
        if let Some(region) = &cfg.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let shared = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared);
        if shared.region().is_none() {
            // Custom endpoints rarely care; AWS itself redirects.
            b = b.region(Region::new("us-east-1"));
        }
        if let Some(endpoint) = &cfg.endpoint {
            b = b.endpoint_url(endpoint).force_path_style(true);
        }
        b = match cfg.checksum {
            ChecksumMode::Md5 => b
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired),
            ChecksumMode::Crc32c => b
                .request_checksum_calculation(RequestChecksumCalculation::WhenSupported)
                .response_checksum_validation(ResponseChecksumValidation::WhenSupported),
        };
        Self {
            client: Client::from_conf(b.build()),
            bucket: cfg.bucket.clone(),
            checksum: cfg.checksum,
        }
    }

    /// Checks that the bucket exists and the credentials work.
    pub async fn check(&self) -> Result<(), S3Error> {
        let r = self.client.head_bucket().bucket(&self.bucket).send().await;
        r.map(|_| ()).map_err(|e| {
            let mut e = classify(&format!("cannot reach bucket {:?}", self.bucket), e);
            if e.kind == S3ErrorKind::NotFound {
                e.kind = S3ErrorKind::NoBucket;
            }
            e
        })
    }

    /// Uploads `data` as `key` in one request, with the chunk's line
    /// numbers as object metadata when known.
    pub async fn put(
        &self,
        key: &str,
        data: Bytes,
        numbers: Option<LineRecord>,
    ) -> Result<(), S3Error> {
        self.send_put(key, data, numbers, None).await
    }

    /// Like [`ObjectStore::put`], if `condition` holds (else
    /// [`S3ErrorKind::Exists`]): a chunk upload never overwrites an object
    /// unless it replaces one it looked at.
    pub async fn put_if(
        &self,
        key: &str,
        data: Bytes,
        numbers: Option<LineRecord>,
        condition: Condition<'_>,
    ) -> Result<(), S3Error> {
        self.send_put(key, data, numbers, Some(condition)).await
    }

    async fn send_put(
        &self,
        key: &str,
        data: Bytes,
        numbers: Option<LineRecord>,
        condition: Option<Condition<'_>>,
    ) -> Result<(), S3Error> {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(CONTENT_TYPE)
            .set_metadata(numbers.map(line_metadata));
        match condition {
            Some(Condition::Absent) => req = req.if_none_match("*"),
            Some(Condition::Matches(etag)) => req = req.if_match(etag),
            None => {}
        }
        req = match self.checksum {
            ChecksumMode::Md5 => req.content_md5(md5_base64(&data)),
            ChecksumMode::Crc32c => req.checksum_algorithm(ChecksumAlgorithm::Crc32C),
        };
        req.body(ByteStream::from(data))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify(&format!("cannot upload {key}"), e))
    }

    /// Creates `key` with `data` unless it exists (`If-None-Match: *`):
    /// `true` when this request created it, `false` when it was there.
    pub async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, S3Error> {
        let res = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .if_none_match("*")
            .content_md5(md5_base64(&data))
            .body(ByteStream::from(data))
            .send()
            .await;
        match res.map_err(|e| classify(&format!("cannot create {key}"), e)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind == S3ErrorKind::Exists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Starts a multipart upload of `key` (with the chunk's line numbers
    /// as metadata when known); returns its id.
    pub async fn start_multipart(
        &self,
        key: &str,
        numbers: Option<LineRecord>,
    ) -> Result<String, S3Error> {
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(CONTENT_TYPE)
            .set_metadata(numbers.map(line_metadata));
        if self.checksum == ChecksumMode::Crc32c {
            req = req.checksum_algorithm(ChecksumAlgorithm::Crc32C);
        }
        let out = req
            .send()
            .await
            .map_err(|e| classify(&format!("cannot start the multipart upload of {key}"), e))?;
        out.upload_id().map(str::to_owned).ok_or_else(|| S3Error {
            message: format!("the store started a multipart upload of {key} without an id"),
            kind: S3ErrorKind::Other,
        })
    }

    /// Uploads part `number` (from 1); returns what completing needs.
    pub async fn put_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
    ) -> Result<UploadedPart, S3Error> {
        let mut req = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number);
        req = match self.checksum {
            ChecksumMode::Md5 => req.content_md5(md5_base64(&data)),
            ChecksumMode::Crc32c => req.checksum_algorithm(ChecksumAlgorithm::Crc32C),
        };
        let out = req
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| classify(&format!("cannot upload part {number} of {key}"), e))?;
        Ok(UploadedPart {
            etag: out.e_tag().unwrap_or_default().to_owned(),
            crc32c: out.checksum_crc32_c().map(str::to_owned),
        })
    }

    /// Completes a multipart upload from its parts, in order, if
    /// `condition` holds: else [`S3ErrorKind::Exists`].
    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
        condition: Condition<'_>,
    ) -> Result<(), S3Error> {
        let parts = parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                CompletedPart::builder()
                    .part_number(i as i32 + 1)
                    .e_tag(&p.etag)
                    .set_checksum_crc32_c(p.crc32c.clone())
                    .build()
            })
            .collect();
        let req = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id);
        let req = match condition {
            Condition::Absent => req.if_none_match("*"),
            Condition::Matches(etag) => req.if_match(etag),
        };
        req.multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .map(|_| ())
        .map_err(|e| classify(&format!("cannot complete the multipart upload of {key}"), e))
    }

    /// Abandons a multipart upload (its parts are freed by the store).
    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify(&format!("cannot abort the multipart upload of {key}"), e))
    }

    /// The size of `key`, or `None` when it does not exist.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, S3Error> {
        Ok(self.head(key).await?.map(|h| h.size))
    }

    /// What a lookup of `key` tells, or `None` when it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectHead>, S3Error> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => {
                let size = out.content_length().unwrap_or(0).max(0) as u64;
                let number = |name: &str| out.metadata()?.get(name)?.parse::<u64>().ok();
                let numbers = match (number(META_FIRST_LINE), number(META_LINES)) {
                    (Some(first), Some(lines)) => Some(LineRecord { size, first, lines }),
                    _ => None,
                };
                Ok(Some(ObjectHead {
                    size,
                    numbers,
                    etag: out.e_tag().map(str::to_owned),
                }))
            }
            Err(e) => {
                let e = classify(&format!("cannot look up {key}"), e);
                if e.kind == S3ErrorKind::NotFound {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Exactly `len` bytes of `key` from `offset` (a ranged GET).
    pub async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, S3Error> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let what = || format!("cannot read {key} at {offset}+{len}");
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes={offset}-{}", offset + len - 1))
            .send()
            .await
            .map_err(|e| classify(&what(), e))?;
        let data = body(out, &what()).await?;
        if data.len() as u64 != len {
            return Err(S3Error {
                message: format!("{}: the store returned {} bytes", what(), data.len()),
                kind: S3ErrorKind::Other,
            });
        }
        Ok(data)
    }

    /// The whole of a small object `key` (at most `max` bytes, else an
    /// error), or `None` when it does not exist.
    pub async fn get_small(&self, key: &str, max: u64) -> Result<Option<Bytes>, S3Error> {
        let what = || format!("cannot read {key}");
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                let e = classify(&what(), e);
                return if e.kind == S3ErrorKind::NotFound {
                    Ok(None)
                } else {
                    Err(e)
                };
            }
        };
        if out
            .content_length()
            .is_some_and(|n| n < 0 || n as u64 > max)
        {
            return Err(S3Error {
                message: format!("{}: larger than {max} bytes", what()),
                kind: S3ErrorKind::Other,
            });
        }
        Ok(Some(body(out, &what()).await?))
    }

    /// Every object under `prefix` (all pages).
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, S3Error> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| classify(&format!("cannot list bucket {:?}", self.bucket), e))?;
            for o in page.contents() {
                let Some(key) = o.key() else { continue };
                out.push(Listed {
                    key: key.to_owned(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    modified_ms: o
                        .last_modified()
                        .and_then(|t| SystemTime::try_from(*t).ok())
                        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_millis() as u64),
                });
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => return Ok(out),
            }
        }
    }

    /// Deletes `key` (absent keys are fine).
    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify(&format!("cannot delete {key}"), e))
    }
}

/// The whole body of a GET (`what`: the error's context).
async fn body(
    out: aws_sdk_s3::operation::get_object::GetObjectOutput,
    what: &str,
) -> Result<Bytes, S3Error> {
    Ok(out
        .body
        .collect()
        .await
        .map_err(|e| S3Error {
            message: format!("{what}: {e}"),
            kind: S3ErrorKind::Other,
        })?
        .into_bytes())
}

/// A part uploaded in a multipart upload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UploadedPart {
    /// The ETag the store answered.
    pub etag: String,
    /// The part's CRC32C, when `--s3-checksum crc32c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<String>,
}

/// Object metadata naming the number of a chunk's first line (see
/// `storage::numbering`), so that a node that lost its disk, and every
/// other node, numbers an evicted chunk's lines as its owner did.
const META_FIRST_LINE: &str = "chunkbus-first-line";
/// Object metadata: the lines in the chunk.
const META_LINES: &str = "chunkbus-lines";

fn line_metadata(r: LineRecord) -> std::collections::HashMap<String, String> {
    [
        (META_FIRST_LINE.to_owned(), r.first.to_string()),
        (META_LINES.to_owned(), r.lines.to_string()),
    ]
    .into()
}
