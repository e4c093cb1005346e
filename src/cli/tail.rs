//! `chunkbus tail -c CATEGORY [-f]`: prints lines without acking.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use chunkbus_client::Client;

/// Long-poll wait while following.
const FOLLOW_WAIT: Duration = Duration::from_secs(1);
/// Bytes per read.
const READ_BYTES: u64 = 4 << 20;

/// Prints every line of `category` held by the node; with `follow`, keeps
/// printing new lines as they arrive.
pub async fn tail(client: Client, category: &str, follow: bool) -> Result<(), String> {
    let mut offsets: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        let chunks = client.chunks(category).await.map_err(|e| e.to_string())?;
        let mut printed = false;
        for c in &chunks {
            let off = offsets.entry(c.name.clone()).or_insert(0);
            while *off < c.size {
                let r = client
                    .read_chunk(category, &c.name, *off, READ_BYTES)
                    .await
                    .map_err(|e| e.to_string())?;
                if r.data.is_empty() {
                    break;
                }
                let data = r.data;
                tokio::task::spawn_blocking(move || {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&data).and_then(|()| out.flush())
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot write to stdout: {e}"))?;
                *off = r.next_offset;
                printed = true;
            }
        }
        if !follow {
            return Ok(());
        }
        if !printed {
            // Park on the newest open chunk until it grows (or a second
            // passes, to notice new chunks of other owners).
            let open = chunks.iter().filter(|c| !c.complete).max_by_key(|c| c.size);
            match open {
                Some(c) => {
                    let off = offsets.get(&c.name).copied().unwrap_or(0);
                    let _ = client
                        .read_chunk_wait(category, &c.name, off, 1, FOLLOW_WAIT)
                        .await;
                }
                None => tokio::time::sleep(FOLLOW_WAIT).await,
            }
        }
    }
}
