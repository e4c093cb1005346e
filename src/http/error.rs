//! Every error the HTTP API can answer, and its status code, in one place.
//!
//! Status codes are chosen for how shippers react: Vector and Fluent Bit
//! retry 408, 429 and 5xx and drop other 4xx, so a transient condition
//! (load, disk pressure) is never a 4xx.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chunkbus_client::{ErrorBody, NameError, ProduceResponse};

use crate::storage::StorageError;

/// Seconds a shed client is told to wait before retrying.
pub const RETRY_AFTER_SECS: u32 = 1;

/// An error answer of the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: a bad name, parameter or body.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no token, or one this node does not know.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: a token without the role or the category.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such chunk or route.
    #[error("{0}")]
    NotFound(String),
    /// 405: the route exists with other methods.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 408: the body did not arrive in time (clients retry it).
    #[error("{0}")]
    RequestTimeout(String),
    /// 413: a line or body above its limit.
    #[error("{0}")]
    TooLarge(String),
    /// 415: unknown Content-Encoding or a body that does not decode.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 416: a read offset past the end.
    #[error("{0}")]
    RangeNotSatisfiable(String),
    /// 503 + Retry-After: load shedding or disk pressure; retry later.
    #[error("{0}")]
    Overloaded(String),
    /// 503 + Retry-After: the node is stopping.
    #[error("{0}")]
    Unavailable(String),
    /// 504: `min_replicas` not reached in time; the data IS stored here
    /// and will still replicate, so the body says where.
    #[error("{message}")]
    ReplicasTimeout {
        /// The sentence.
        message: String,
        /// Where the lines were stored, with `replicas` confirmed.
        written: ProduceResponse,
    },
    /// 507: the disk is full.
    #[error("{0}")]
    InsufficientStorage(String),
    /// 500: an I/O failure or a bug; the message says what failed.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The status code of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RangeNotSatisfiable(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::Overloaded(_) | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::ReplicasTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl ApiError {
    /// Whether the answer ends the connection: the request's body was not
    /// read to its end (too large, or too slow), so the connection cannot
    /// carry another request. Saying so (`Connection: close`) keeps a
    /// client from sending its next request on a connection the node is
    /// closing, where it would fail.
    pub fn closes_connection(&self) -> bool {
        matches!(self, ApiError::TooLarge(_) | ApiError::RequestTimeout(_))
    }

    /// `resp`, this error written in another API's shape, with the headers
    /// the native answer would carry (`Retry-After`, `Connection`).
    pub fn with_headers_on(self, mut resp: Response) -> Response {
        let native = self.into_response();
        for h in [header::RETRY_AFTER, header::CONNECTION] {
            if let Some(v) = native.headers().get(&h) {
                resp.headers_mut().insert(h, v.clone());
            }
        }
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let close = self.closes_connection();
        if status.is_server_error() && !matches!(self, ApiError::Overloaded(_)) {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        }
        let retry = matches!(self, ApiError::Overloaded(_) | ApiError::Unavailable(_));
        let challenge = matches!(self, ApiError::Unauthorized(_));
        let mut resp = match self {
            ApiError::ReplicasTimeout { message, written } => {
                let mut body = serde_json::to_value(written).unwrap_or_default();
                body["error"] = serde_json::Value::String(message);
                (status, Json(body)).into_response()
            }
            other => (
                status,
                Json(ErrorBody {
                    error: other.to_string(),
                }),
            )
                .into_response(),
        };
        if retry {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if challenge {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"chunkbus\", Basic realm=\"chunkbus\""),
            );
        }
        if close {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> Self {
        match e {
            crate::auth::AuthError::Unauthenticated(m) => ApiError::Unauthorized(m),
            crate::auth::AuthError::Forbidden(m) => ApiError::Forbidden(m),
        }
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        let msg = e.to_string();
        match e {
            StorageError::Name(_)
            | StorageError::NotLineBoundary { .. }
            | StorageError::OwnChunk { .. }
            | StorageError::ReplicaGap { .. } => ApiError::BadRequest(msg),
            StorageError::UnknownCategory(_)
            | StorageError::UnknownChunk { .. }
            | StorageError::RemoteMissing { .. } => ApiError::NotFound(msg),
            StorageError::OffsetPastEnd { .. } => ApiError::RangeNotSatisfiable(msg),
            StorageError::HighWater { .. }
            | StorageError::Remote { .. }
            | StorageError::NotReady(_)
            | StorageError::OutOfFiles { .. } => ApiError::Overloaded(msg),
            StorageError::DiskFull(_) | StorageError::TooManyCategories { .. } => {
                ApiError::InsufficientStorage(msg)
            }
            StorageError::ShuttingDown => ApiError::Unavailable(msg),
            StorageError::Locked { .. }
            | StorageError::IndexExhausted { .. }
            | StorageError::CopyDisagrees { .. }
            | StorageError::NotRestorable { .. }
            | StorageError::Io { .. } => ApiError::Internal(msg),
        }
    }
}

impl From<crate::consumers::AckError> for ApiError {
    fn from(e: crate::consumers::AckError) -> Self {
        use crate::consumers::AckError;
        match e {
            AckError::NotHeld { .. } | AckError::NotABoundary(_) => {
                ApiError::BadRequest(e.to_string())
            }
            AckError::Storage(e) => e.into(),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        ApiError::BadRequest(format!("invalid path: {}", e.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::BadRequest(format!("invalid query string: {}", e.body_text()))
    }
}
