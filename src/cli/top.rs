//! `chunkbus top`: the console's figures (`GET /v1/console`) as tables in
//! a terminal, refreshed every second until `q` or Ctrl-C; `--once` prints
//! them a single time, for scripts.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use chunkbus_client::Client;
use chunkbus_client::console::ConsoleView;
use comfy_table::presets::{NOTHING, UTF8_HORIZONTAL_ONLY};
use comfy_table::{Cell, CellAlignment, ContentArrangement, Table};
use crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
use crossterm::{cursor, execute, terminal};

/// `chunkbus top`: live until `q`/Ctrl-C, or once with `once`.
pub async fn top(client: Client, once: bool, every: Duration) -> Result<(), String> {
    if once {
        let view = client.console().await.map_err(|e| e.to_string())?;
        print!("{}", render(&view, None));
        return Ok(());
    }
    if !std::io::stdout().is_terminal() {
        return Err("chunkbus top needs a terminal; use --once for a single table".to_owned());
    }
    let _screen = Screen::enter()?;
    let (quit_tx, mut quit) = tokio::sync::oneshot::channel();
    // Keys are read on a thread of their own (crossterm reads block).
    std::thread::spawn(move || {
        while let Ok(ev) = crossterm::event::read() {
            if let Event::Key(KeyEvent {
                code, modifiers, ..
            }) = ev
                && (matches!(code, KeyCode::Char('q') | KeyCode::Esc)
                    || (code == KeyCode::Char('c') && modifiers.contains(KeyModifiers::CONTROL)))
            {
                let _ = quit_tx.send(());
                return;
            }
        }
    });
    // In raw mode Ctrl-C is a key, not SIGINT; a SIGTERM, SIGHUP or SIGQUIT
    // from elsewhere also ends it through the same exit, so the terminal
    // is given back (the screen is left when dropped).
    let signalled = terminating_signal()?;
    tokio::pin!(signalled);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut quit => return Ok(()),
            () = &mut signalled => return Ok(()),
        }
        let view = tokio::select! {
            v = client.console() => v,
            _ = &mut quit => return Ok(()),
            () = &mut signalled => return Ok(()),
        };
        let text = match view {
            Ok(view) => {
                // A terminal too narrow (or that does not say) gets plain
                // columns rather than tables squeezed into it.
                let width = terminal::size().ok().map(|(w, _)| w).filter(|&w| w >= 60);
                render(&view, width)
            }
            Err(e) => format!("cannot read the console of the node: {e} (retrying)\n"),
        };
        let mut out = std::io::stdout().lock();
        let _ = execute!(
            out,
            cursor::MoveTo(0, 0),
            terminal::Clear(terminal::ClearType::All)
        );
        // Raw mode: a line feed does not return the carriage.
        let _ = write!(
            out,
            "{}\r\nq to quit\r\n",
            text.trim_end().replace('\n', "\r\n")
        );
        let _ = out.flush();
    }
}

/// Ends at the first SIGTERM, SIGHUP or SIGQUIT (handlers set up now).
fn terminating_signal() -> Result<impl Future<Output = ()>, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let listen = |kind| signal(kind).map_err(|e| format!("cannot handle signals: {e}"));
    let mut term = listen(SignalKind::terminate())?;
    let mut hup = listen(SignalKind::hangup())?;
    let mut quit = listen(SignalKind::quit())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = hup.recv() => {}
            _ = quit.recv() => {}
        }
    })
}

/// The alternate screen in raw mode, left when dropped.
struct Screen;

impl Screen {
    fn enter() -> Result<Self, String> {
        terminal::enable_raw_mode().map_err(|e| format!("cannot set up the terminal: {e}"))?;
        let _ = execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        );
        Ok(Self)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}

/// The view as text: a header line, then tables of nodes, categories and
/// consumers, and the last errors. `width`: the terminal's, if any.
pub fn render(v: &ConsoleView, width: Option<u16>) -> String {
    let c = &v.cluster;
    let mut out = format!(
        "chunkbus {} · node {} · up {} · nodes {} up, {} down · in {} lines/s, {}/s · S3 backlog {} · under-replicated {} · errors (5 min) {}\n\n",
        v.version,
        v.node,
        seconds(v.uptime_seconds as f64),
        c.nodes_up,
        c.nodes_down,
        rate(c.lines_per_second),
        bytes(c.bytes_per_second as u64),
        match (c.s3_backlog_chunks, c.s3_backlog_bytes) {
            (Some(n), Some(b)) => format!("{n} chunks, {}", bytes(b)),
            _ => "off".to_owned(),
        },
        c.under_replicated_chunks,
        c.errors_last_5m,
    );
    let mut nodes = table(
        width,
        &[
            "NODE",
            "STATE",
            "LAST CONTACT",
            "COPY LAG",
            "DISK",
            "VERSION",
        ],
    );
    for n in &v.nodes {
        let state = if n.this_node {
            "this node"
        } else if n.forgotten {
            "forgotten"
        } else if n.up {
            "up"
        } else {
            "down"
        };
        nodes.add_row(vec![
            Cell::new(&n.name),
            Cell::new(state),
            Cell::new(match n.last_contact_seconds {
                Some(s) => format!("{} ago", seconds(s)),
                None => "-".to_owned(),
            }),
            Cell::new(if n.this_node {
                "-".to_owned()
            } else {
                format!("{}, {}", bytes(n.lag_bytes), seconds(n.lag_seconds))
            }),
            Cell::new(match &n.disk {
                Some(d) => format!("{}% (high water {}%)", d.used_percent, d.high_water_percent),
                None => "-".to_owned(),
            }),
            Cell::new(n.version.as_deref().unwrap_or("-")),
        ]);
    }
    out.push_str(&format!("{nodes}\n\n"));
    let mut cats = table(
        width,
        &[
            "CATEGORY",
            "LINES/S",
            "BYTES/S",
            "CHUNKS",
            "OPEN",
            "UPLOADED",
            "EVICTED",
            "NOT UPLOADED FOR",
            "MAX CONSUMER LAG",
        ],
    );
    for cat in &v.categories {
        cats.add_row(vec![
            Cell::new(&cat.name),
            num(rate(cat.lines_per_second)),
            num(bytes(cat.bytes_per_second as u64)),
            num(cat.chunks.total),
            num(cat.chunks.open),
            num(cat.chunks.uploaded),
            num(cat.chunks.evicted),
            num(cat
                .oldest_not_uploaded_seconds
                .map_or("-".to_owned(), seconds)),
            num(bytes(cat.max_consumer_lag_bytes)),
        ]);
    }
    out.push_str(&format!("{cats}\n\n"));
    let mut consumers = table(
        width,
        &[
            "CATEGORY", "CONSUMER", "LAG", "LAG TIME", "LAST ACK", "STATE",
        ],
    );
    for cat in &v.categories {
        for co in &cat.consumers {
            consumers.add_row(vec![
                Cell::new(&cat.name),
                Cell::new(&co.name),
                num(bytes(co.lag_bytes)),
                num(seconds(co.lag_seconds)),
                Cell::new(match co.last_ack_seconds {
                    Some(s) => format!("{} ago", seconds(s)),
                    None => "not since start".to_owned(),
                }),
                Cell::new(if co.stalled {
                    "STALLED"
                } else if co.lag_bytes > 0 {
                    "behind"
                } else {
                    "caught up"
                }),
            ]);
        }
    }
    out.push_str(&format!("{consumers}\n"));
    if !v.errors.is_empty() {
        out.push_str("\nlast warnings and errors:\n");
        for e in v.errors.iter().take(5) {
            out.push_str(&format!("  {} {} {}\n", e.time, e.level, e.message));
        }
    }
    out
}

fn table(width: Option<u16>, header: &[&str]) -> Table {
    let mut t = Table::new();
    t.set_header(header.to_vec());
    match width {
        // A terminal: rules between header and rows, fitted to its width.
        Some(w) => {
            t.load_style(UTF8_HORIZONTAL_ONLY)
                .set_width(w)
                .set_content_arrangement(ContentArrangement::Dynamic);
        }
        // `--once`: plain columns, one row per line, for scripts.
        None => {
            t.load_style(NOTHING)
                .force_no_tty()
                .set_content_arrangement(ContentArrangement::Disabled);
        }
    }
    t
}

fn num(v: impl ToString) -> Cell {
    Cell::new(v.to_string()).set_alignment(CellAlignment::Right)
}

/// Exact below 10 KiB (so scripts can compare small figures), binary
/// units above.
pub fn bytes(n: u64) -> String {
    if n < 10 * 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn seconds(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0}s")
    } else if s < 7200.0 {
        format!("{:.0}m", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1}h", s / 3600.0)
    } else {
        format!("{:.1}d", s / 86400.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_exact_when_small_and_binary_above() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(10_239), "10239 B");
        assert_eq!(bytes(10_240), "10.0 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(seconds(59.4), "59s");
        assert_eq!(seconds(600.0), "10m");
        assert_eq!(rate(12_345.0), "12.3k");
    }
}
