//! The Kafka listener (`--kafka-listen`): every node is also a Kafka broker
//! for every category. Topic = category; partition `p` = the lines of the
//! `p`-th node of `--peers`, numbered as the storage numbers them (see
//! `storage::numbering`), so an offset names the same line on every node.
//! See docs/kafka.md for the mapping and what is not supported.
//!
//! Frames are length-checked before anything is read into memory and
//! reserved from the node's in-flight budget; requests of one connection
//! are handled in order, one at a time, the next one read while the one
//! before is handled.

mod broker;
pub mod groups;
mod landmarks;
pub mod producers;
pub mod records;
pub mod requests;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::KafkaSettings;
use crate::http::AppState;
use crate::http::body::Reservation;

/// A connection that sends nothing for this long is closed (clients
/// reconnect; Kafka brokers close idle connections after 10 minutes).
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// How often consumer group members' deadlines are checked.
const GROUP_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// Room in a frame for everything but the records of a produce request.
const FRAME_OVERHEAD_BYTES: u64 = 1 << 20;

/// Serves Kafka clients on `listener` (plain TCP, or TLS with the HTTP
/// listener's certificate), at most `max_connections` at once, until
/// `shutdown`; then stops accepting and closes every connection after its
/// current request.
pub async fn serve<L>(
    mut listener: L,
    st: Arc<AppState>,
    settings: KafkaSettings,
    max_connections: usize,
    shutdown: CancellationToken,
) where
    L: axum::serve::Listener,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    L::Addr: std::fmt::Debug,
{
    let broker = Arc::new(broker::Broker::new(st, settings));
    let conns = TaskTracker::new();
    // Consumer group members whose session or rebalance time ran out are
    // dropped (Kafka checks them on the same scale).
    conns.spawn({
        let (broker, shutdown) = (broker.clone(), shutdown.clone());
        async move {
            let mut tick = tokio::time::interval(GROUP_CHECK_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => broker.groups.expire(),
                }
            }
        }
    });
    // At the cap, new connections wait in the kernel's backlog.
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            s = slots.clone().acquire_owned() => s,
        };
        let Ok(slot) = slot else { break };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (broker, shutdown) = (broker.clone(), shutdown.clone());
        conns.spawn(async move {
            let _slot = slot;
            if let Err(e) = connection(&broker, stream, &shutdown).await {
                tracing::debug!(?peer, error = %e, "kafka connection closed");
            }
        });
    }
    conns.close();
    conns.wait().await;
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(String),
}

async fn connection(
    broker: &broker::Broker,
    stream: impl AsyncRead + AsyncWrite + Unpin,
    shutdown: &CancellationToken,
) -> Result<(), ConnError> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    // The next frame is read while the one before it is handled (one ahead
    // at most, reserved from the in-flight budget like the one handled), so
    // reading a produce request overlaps storing the one before; answers
    // stay in request order. The reader stops at EOF, at shutdown or once
    // the answerer ended; the answerer ends once the reader did and every
    // frame read is answered, so a bad frame read ahead does not cut short
    // the request before it.
    let (ahead, mut frames) = tokio::sync::mpsc::channel(1);
    let stop = shutdown.child_token();
    let reader = {
        let stop = &stop;
        async move {
            let read = loop {
                match read_frame(broker, &mut rd, stop).await {
                    Ok(Some(frame)) => {
                        if ahead.send(frame).await.is_err() {
                            break Ok(());
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            // Now, not when the joined future is dropped: the answerer
            // waits for it.
            drop(ahead);
            read
        }
    };
    let answerer = async {
        let mut conn = broker::Connection::default();
        while let Some((frame, mut reservation)) = frames.recv().await {
            let answer = broker
                .handle(&mut conn, frame, &mut reservation, shutdown)
                .await
                .map_err(|e| {
                    broker.st.metrics.kafka_bad_frames.inc();
                    ConnError::Protocol(e)
                })?;
            drop(reservation);
            if let Some(frame) = answer {
                wr.write_all(&frame).await?;
            }
        }
        Ok(())
    };
    let answerer = async {
        let answered = answerer.await;
        stop.cancel();
        answered
    };
    let (read, answered) = tokio::join!(reader, answerer);
    answered.and(read)
}

/// Reads the next request frame and reserves its bytes; `None` when the
/// client closed the connection or the node shuts down.
async fn read_frame(
    broker: &broker::Broker,
    stream: &mut (impl AsyncRead + Unpin),
    shutdown: &CancellationToken,
) -> Result<Option<(Bytes, Reservation)>, ConnError> {
    let max_frame = broker.st.limits.max_body_bytes + FRAME_OVERHEAD_BYTES;
    let mut len = [0u8; 4];
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(None),
        r = tokio::time::timeout(IDLE_TIMEOUT, stream.read_exact(&mut len)) => match r {
            Err(_) => return Err(ConnError::Protocol("idle".into())),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Ok(r) => { r?; }
        },
    }
    let len = i32::from_be_bytes(len);
    if len < 0 || len as u64 > max_frame {
        broker.st.metrics.kafka_bad_frames.inc();
        return Err(ConnError::Protocol(format!(
            "a frame of {len} bytes (at most {max_frame})"
        )));
    }
    let mut reservation = broker.st.inflight.reservation();
    if reservation.grow(len as u64).is_err() {
        broker.st.metrics.shed_requests.inc();
        return Err(ConnError::Protocol(
            "the in-flight budget is spent; the client reconnects and retries".into(),
        ));
    }
    // Read into spare capacity: nothing is zeroed first.
    let mut frame = BytesMut::with_capacity(len as usize);
    tokio::time::timeout(broker.st.limits.request_timeout, async {
        while frame.len() < len as usize {
            // Never past this frame: the next one stays in the socket.
            let left = len as usize - frame.len();
            let mut room = bytes::BufMut::limit(&mut frame, left);
            if stream.read_buf(&mut room).await? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
        }
        Ok(())
    })
    .await
    .map_err(|_| ConnError::Protocol("a frame took too long to arrive".into()))??;
    Ok(Some((frame.freeze(), reservation)))
}
