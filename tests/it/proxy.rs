//! A TCP proxy between two nodes that a test can blackhole: while cut,
//! bytes stop flowing in both directions and new connections hang, as when
//! a network drops packets. Healing resets the held connections so that
//! clients reconnect at once.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One directed link `from → to`.
pub struct Proxy {
    pub addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let (cut, _) = watch::channel(false);
        let task = {
            let target = target.clone();
            let cut = cut.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    let to = *target.lock().unwrap();
                    tokio::spawn(forward(client, to, cut.subscribe()));
                }
            })
        };
        Self {
            addr,
            target,
            cut,
            task,
        }
    }

    /// Where connections go from now on.
    pub fn set_target(&self, to: SocketAddr) {
        *self.target.lock().unwrap() = Some(to);
    }

    /// Blackholes (`true`) or heals (`false`) the link.
    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(mut client: TcpStream, to: Option<SocketAddr>, mut cut: watch::Receiver<bool>) {
    if *cut.borrow_and_update() {
        // Hang until healed, then reset.
        let _ = cut.wait_for(|c| !*c).await;
        return;
    }
    let Some(to) = to else { return };
    let Ok(mut server) = TcpStream::connect(to).await else {
        return;
    };
    let blackholed = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
        _ = cut.wait_for(|c| *c) => true,
    };
    if blackholed {
        // Keep both sockets open and silent until healed.
        let _ = cut.wait_for(|c| !*c).await;
    }
}
