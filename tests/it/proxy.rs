//! A TCP proxy between two nodes that a test can blackhole: while cut,
//! bytes stop flowing in both directions and new connections hang, as when
//! a network drops packets. Healing either resets the held connections so
//! that clients reconnect at once ([`Cut::Reset`]), or lets them go on and
//! delivers what was held, late, as TCP does after a long outage
//! ([`Cut::Hold`]). The proxy counts the bytes it handed to the client
//! side, so a test can wait until an answer sits in a (paused) client's
//! socket buffer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a heal does with the connections held while cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Flowing.
    Open,
    /// Blackholed; healing resets the held connections.
    Reset,
    /// Blackholed; healing delivers what was held and carries on.
    Hold,
}

/// One directed link `from → to`.
pub struct Proxy {
    pub addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    /// The mode, and how many resetting cuts there were (so a connection
    /// knows it must go even when it only sees the heal).
    cut: watch::Sender<(Cut, u64)>,
    to_client: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let (cut, _) = watch::channel((Cut::Open, 0));
        let to_client = Arc::new(AtomicU64::new(0));
        let task = {
            let target = target.clone();
            let cut = cut.clone();
            let to_client = to_client.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    let to = *target.lock().unwrap();
                    tokio::spawn(forward(client, to, cut.subscribe(), to_client.clone()));
                }
            })
        };
        Self {
            addr,
            target,
            cut,
            to_client,
            task,
        }
    }

    /// Where connections go from now on.
    pub fn set_target(&self, to: SocketAddr) {
        *self.target.lock().unwrap() = Some(to);
    }

    /// Blackholes (`true`, resetting at the heal) or heals (`false`) the link.
    pub fn set_cut(&self, cut: bool) {
        self.set_mode(if cut { Cut::Reset } else { Cut::Open });
    }

    /// Sets the link's state.
    pub fn set_mode(&self, mode: Cut) {
        self.cut.send_modify(|(m, resets)| {
            *m = mode;
            if mode == Cut::Reset {
                *resets += 1;
            }
        });
    }

    /// Bytes handed to the client side so far (answers of the target).
    pub fn bytes_to_client(&self) -> u64 {
        self.to_client.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    client: TcpStream,
    to: Option<SocketAddr>,
    mut cut: watch::Receiver<(Cut, u64)>,
    to_client: Arc<AtomicU64>,
) {
    let (mode, resets) = *cut.borrow_and_update();
    if mode != Cut::Open {
        // Hang until healed; a reset link then drops the connection.
        let _ = cut.wait_for(|c| c.0 == Cut::Open).await;
        if mode == Cut::Reset {
            return;
        }
    }
    let resets = resets + u64::from(mode == Cut::Reset);
    let Some(to) = to else { return };
    let Ok(server) = TcpStream::connect(to).await else {
        return;
    };
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    let up = pump(client_r, server_w, cut.clone(), resets, None);
    let down = pump(server_r, client_w, cut, resets, Some(to_client));
    tokio::join!(up, down);
}

/// Copies `from` to `to`, pausing while the link is cut, until either side
/// closes or a resetting cut (after `resets` of them) heals; counts the
/// bytes written into `count`.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut cut: watch::Receiver<(Cut, u64)>,
    resets: u64,
    count: Option<Arc<AtomicU64>>,
) {
    let mut buf = vec![0u8; 64 << 10];
    // Waits for the link to flow; false when the connection must go.
    let flowing = async |cut: &mut watch::Receiver<(Cut, u64)>| {
        let ok = cut.wait_for(|c| c.0 == Cut::Open).await.is_ok();
        ok && cut.borrow().1 == resets
    };
    loop {
        if !flowing(&mut cut).await {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            // Cut while waiting: stop reading; held bytes stay in the
            // kernel's buffers until the heal.
            _ = cut.wait_for(|c| c.0 != Cut::Open) => continue,
        };
        // Bytes read just before a cut are held until the heal too.
        if !flowing(&mut cut).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if let Some(c) = &count {
            c.fetch_add(n as u64, Ordering::SeqCst);
        }
    }
    let _ = to.shutdown().await;
}

/// A held link delivers late what it held; a reset link drops it.
#[tokio::test]
async fn a_held_link_delivers_late_and_a_reset_link_drops() {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let proxy = Proxy::start().await;
    proxy.set_target(echo_addr);
    for mode in [Cut::Hold, Cut::Reset] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"a").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        proxy.set_mode(mode);
        s.write_all(b"b").await.unwrap();
        // Nothing comes back while the link is cut.
        let early = tokio::time::timeout(std::time::Duration::from_millis(200), s.read(&mut b));
        assert!(early.await.is_err(), "{mode:?} let bytes through");
        proxy.set_mode(Cut::Open);
        let late = s.read(&mut b).await;
        match mode {
            Cut::Hold => assert_eq!((late.unwrap(), b[0]), (1, b'b')),
            _ => assert!(
                late.is_err() || late.unwrap() == 0,
                "a reset link delivered"
            ),
        }
    }
    // "a" twice, and the held "b".
    assert_eq!(proxy.bytes_to_client(), 3);
}
