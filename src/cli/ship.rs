//! `chunkbus ship`: flags for one group of files, or a TOML file for many.
//!
//! ```toml
//! servers = ["http://10.0.0.1:8080", "http://10.0.0.2:8080"]
//! registry-dir = "/var/lib/chunkbus-ship"
//!
//! [[group]]
//! category = "nginx.access"
//! paths = ["/var/log/nginx/access.log*"]
//!
//! [[group]]
//! category = "app"
//! paths = ["/var/log/app/"]
//! from = "end"
//! ```

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chunkbus_client::Compression;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::{HumanDuration, ShipCmd};
use crate::ship::{self, ShipConfig};

/// Rescan interval when no change event arrives.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ShipFile {
    servers: Option<Vec<String>>,
    registry_dir: Option<PathBuf>,
    partial_line_timeout: Option<HumanDuration>,
    compression: Option<String>,
    group: Vec<GroupFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupFile {
    category: String,
    paths: Vec<String>,
    from: Option<String>,
}

fn compression(s: &str) -> Result<Compression, String> {
    match s {
        "none" => Ok(Compression::None),
        "gzip" => Ok(Compression::Gzip),
        "zstd" => Ok(Compression::Zstd),
        other => Err(format!("compression {other:?} must be none, gzip or zstd")),
    }
}

fn from_end(s: &str) -> Result<bool, String> {
    match s {
        "beginning" => Ok(false),
        "end" => Ok(true),
        other => Err(format!("from = {other:?} must be beginning or end")),
    }
}

/// The shipper groups described by the command line (or its config file).
pub fn groups(cmd: ShipCmd) -> Result<Vec<ShipConfig>, String> {
    let Some(path) = cmd.config else {
        let category = cmd.category.ok_or("ship needs -c CATEGORY (or --config)")?;
        if cmd.paths.is_empty() {
            return Err("ship needs at least one path, glob or directory".into());
        }
        chunkbus_client::names::validate_category(&category).map_err(|e| e.to_string())?;
        let token = cmd.server.token()?;
        let ca_pem = cmd.server.ca_pem()?;
        return Ok(vec![ShipConfig {
            token,
            ca_pem,
            servers: cmd.server.servers,
            category,
            patterns: cmd.paths,
            registry: cmd.registry,
            from_end: from_end(&cmd.from)?,
            partial_line_timeout: cmd.partial_line_timeout.0,
            compression: compression(&cmd.compression)?,
            poll_interval: POLL_INTERVAL,
            progress: None,
        }]);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file: ShipFile =
        toml::from_str(&text).map_err(|e| format!("invalid {}: {e}", path.display()))?;
    let dir = file
        .registry_dir
        .unwrap_or_else(|| PathBuf::from("./chunkbus-ship"));
    let comp = compression(file.compression.as_deref().unwrap_or("zstd"))?;
    let token = cmd.server.token()?;
    let ca_pem = cmd.server.ca_pem()?;
    file.group
        .into_iter()
        .map(|g| {
            chunkbus_client::names::validate_category(&g.category).map_err(|e| e.to_string())?;
            Ok(ShipConfig {
                token: token.clone(),
                ca_pem: ca_pem.clone(),
                servers: file
                    .servers
                    .clone()
                    .unwrap_or_else(|| cmd.server.servers.clone()),
                registry: dir.join(format!("{}.registry.json", g.category)),
                category: g.category,
                patterns: g.paths,
                from_end: from_end(g.from.as_deref().unwrap_or("beginning"))?,
                partial_line_timeout: file
                    .partial_line_timeout
                    .map_or(Duration::from_secs(5), |d| d.0),
                compression: comp,
                poll_interval: POLL_INTERVAL,
                progress: None,
            })
        })
        .collect()
}

/// Runs every group until SIGTERM or SIGINT, then flushes and saves.
/// With one group and stderr a terminal, a progress bar shows the catching
/// up (bytes acknowledged out of what the files held), until caught up.
pub async fn ship(cmd: ShipCmd) -> Result<(), String> {
    let mut groups = groups(cmd)?;
    if let [group] = groups.as_mut_slice()
        && std::io::stderr().is_terminal()
    {
        let progress = Arc::new(ship::ShipProgress::default());
        group.progress = Some(progress.clone());
        tokio::spawn(catching_up(group.category.clone(), progress));
    }
    let stop = CancellationToken::new();
    tokio::spawn(crate::server::stop_on_signal(
        stop.clone(),
        "sending what was read and saving the registry",
    ));
    let mut tasks = tokio::task::JoinSet::new();
    for g in groups {
        tasks.spawn(ship::run(g, stop.clone()));
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Draws the shipper's catching up until nothing is left behind, then
/// says so once.
async fn catching_up(category: String, progress: Arc<ship::ShipProgress>) {
    let mut bar = super::progress::Progress::new(&category, Some(0), true);
    let (mut bytes, mut lines) = (0, 0);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let acked = progress.acked.load(Ordering::Relaxed);
        let sent_lines = progress.lines.load(Ordering::Relaxed);
        let behind = progress.behind.load(Ordering::Relaxed);
        bar.set_total(acked + behind);
        bar.add(acked - bytes, sent_lines - lines);
        (bytes, lines) = (acked, sent_lines);
        if behind == 0 && progress.measured.load(Ordering::Relaxed) {
            bar.finish();
            eprintln!("{category}: caught up ({acked} bytes shipped); following");
            return;
        }
    }
}
