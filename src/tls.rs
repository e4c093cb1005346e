//! TLS for clients and peers (`--tls-cert`, `--tls-key`), with rustls.
//!
//! Handshakes run on their own tasks, a bounded number at once and each
//! bounded in time, so that a client that connects and stays silent holds
//! neither the accept loop nor anyone else's handshake. When every slot is
//! taken, the handshake that started first and is not finished is dropped
//! to make room: sockets that never send a ClientHello cannot make real
//! clients wait for the handshake timeout. A finished handshake keeps its
//! slot until the server takes the connection, so that while the
//! connection cap is full, connections wait in the kernel's backlog rather
//! than pile up here.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once, at most.
const MAX_HANDSHAKES: usize = 1024;

/// A certificate or key that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// The server side of TLS: certificate chain and key, from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| {
            TlsError(format!(
                "cannot read certificates from {}: {e}",
                cert.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsError(format!("no certificate in {}", cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        TlsError(format!(
            "cannot read the private key from {}: {e}",
            key.display()
        ))
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError(format!("the certificate and key do not fit together: {e}")))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A listener that hands out connections whose TLS handshake is done.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Accepts on `tcp` and runs handshakes with `config`.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let addr = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, ready) = mpsc::channel(64);
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let accept_task = tokio::spawn(async move {
            // Handshakes in the order they started, each with whether it
            // is finished (its connection waiting for the server).
            let mut started: VecDeque<(tokio::task::AbortHandle, Arc<AtomicBool>)> =
                VecDeque::new();
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                started.retain(|(h, _)| !h.is_finished());
                let permit = match slots.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        // Full: the oldest unfinished handshake goes
                        // (dropping its task closes its socket and frees its
                        // slot); if every one is finished, wait.
                        if let Some(at) = started
                            .iter()
                            .position(|(_, shaken)| !shaken.load(Ordering::Acquire))
                            && let Some((oldest, _)) = started.remove(at)
                        {
                            oldest.abort();
                            tracing::debug!(
                                "TLS handshake slots full; dropped the oldest handshake"
                            );
                        }
                        let Ok(permit) = slots.clone().acquire_owned().await else {
                            return;
                        };
                        permit
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                let shaken = Arc::new(AtomicBool::new(false));
                let done = shaken.clone();
                let task = tokio::spawn(async move {
                    let shake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                    match shake.await {
                        Ok(Ok(tls)) => {
                            // Set before the next await: from here on this
                            // task is never chosen to make room.
                            done.store(true, Ordering::Release);
                            let _ = tx.send((tls, peer)).await;
                            drop(permit);
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
                started.push_back((task.abort_handle(), shaken));
            }
        });
        Ok(Self {
            ready,
            addr,
            accept_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task ended (it only does when dropped): wait forever;
            // graceful shutdown ends the server.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}
