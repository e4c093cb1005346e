use reqwest::StatusCode;

/// What can go wrong when talking to a chunkbus server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server URL could not be parsed.
    #[error("invalid server URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A name was invalid; the request was not sent.
    #[error(transparent)]
    Name(#[from] crate::NameError),
    /// The request did not reach the server or the answer did not arrive.
    #[error("request to {url} failed: {source}")]
    Transport {
        /// The URL of the request.
        url: String,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error("server answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: StatusCode,
        /// The server's error sentence (or the raw body).
        message: String,
    },
    /// The server answered 2xx with a body or header this client does not understand.
    #[error("unexpected answer from {url}: {reason}")]
    Protocol {
        /// The URL of the request.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

impl ClientError {
    /// True when the request may have been stored although it failed: the
    /// answer did not come back (a timeout, a connection lost after the
    /// request was sent), 504 (stored, fewer copies than asked) or another
    /// 5xx but 503 (which says nothing was stored). An idempotent producer
    /// retries those on the same node, which answers with the original
    /// position if it had stored it.
    pub fn may_be_stored(&self) -> bool {
        match self {
            ClientError::Transport { source, .. } => !source.is_connect(),
            ClientError::Status { status, .. } => {
                status.is_server_error() && *status != StatusCode::SERVICE_UNAVAILABLE
            }
            _ => false,
        }
    }

    /// True for errors a producer should retry (on this or another node):
    /// connection failures, 408, 429 and 5xx.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
            }
            _ => false,
        }
    }
}
