//! The `chunkbus` binary: parses arguments, sets up logging, runs.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use chunkbus::cli;
use chunkbus::config::{AdminCommand, Cli, Command, ServeConfig};

/// mimalloc: request handling allocates many short-lived buffers; it cut
/// allocator time measurably in `scripts/bench` compared with glibc malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs to stderr as RUST_LOG says; warnings and errors are also kept
    // for the console (`/ui`, `GET /v1/console`).
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter(
                    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
                ),
        )
        .with(chunkbus::console::RecentLayer.with_filter(LevelFilter::WARN))
        .init();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the async runtime: {e}"))
    };
    let result = match cli.command {
        Command::Serve(args) => ServeConfig::resolve(*args)
            .map_err(|e| e.to_string())
            .and_then(|cfg| {
                runtime()?
                    .block_on(chunkbus::server::serve(cfg))
                    .map_err(|e| e.to_string())
            }),
        Command::Produce(cmd) => runtime().and_then(|rt| {
            let compression = match cmd.compression.as_str() {
                "gzip" => chunkbus_client::Compression::Gzip,
                "zstd" => chunkbus_client::Compression::Zstd,
                _ => chunkbus_client::Compression::None,
            };
            let token = cmd.server.token()?;
            let ca_pem = cmd.server.ca_pem()?;
            rt.block_on(cli::produce(cli::produce::ProduceArgs {
                token,
                ca_pem,
                servers: cmd.server.servers,
                category: cmd.category,
                files: cmd.files,
                compression,
                options: chunkbus_client::ProduceOptions {
                    sync: cmd.sync,
                    min_replicas: cmd.min_replicas,
                    timeout: None,
                },
            }))
        }),
        Command::Consume(cmd) => runtime().and_then(|rt| {
            let token = cmd.server.token()?;
            let ca_pem = cmd.server.ca_pem()?;
            rt.block_on(cli::consume(cli::consume::ConsumeArgs {
                token,
                ca_pem,
                servers: cmd.server.servers,
                category: cmd.category,
                consumer: cmd.consumer,
                until_idle: cmd.until_idle.map(|d| d.0),
                start_latest: cmd.from_latest,
            }))
        }),
        Command::Tail(cmd) => runtime().and_then(|rt| {
            rt.block_on(async {
                let client = cli::first_client(&cmd.server)?;
                cli::tail(client, &cmd.category, cmd.follow).await
            })
        }),
        Command::Ship(cmd) => runtime().and_then(|rt| rt.block_on(cli::ship(cmd))),
        Command::Categories(s) => runtime().and_then(|rt| rt.block_on(cli::categories(&s))),
        Command::Status(s) => runtime().and_then(|rt| rt.block_on(cli::status(&s))),
        Command::Top(cmd) => runtime().and_then(|rt| {
            rt.block_on(async {
                let client = cli::first_client(&cmd.server)?;
                cli::top(client, cmd.once, cmd.interval.0).await
            })
        }),
        Command::Admin(AdminCommand::ForgetNode {
            node,
            server,
            token_file,
        }) => runtime().and_then(|rt| {
            rt.block_on(async {
                let token = chunkbus::config::read_token(token_file.as_deref())?;
                let client = chunkbus_client::Client::with_token(&server, token.as_deref())
                    .map_err(|e| e.to_string())?;
                let report = client.forget_node(&node).await.map_err(|e| e.to_string())?;
                println!(
                    "{}: {} open chunk(s) completed on {server}",
                    report.node, report.chunks_completed
                );
                let mut failed = false;
                for (peer, outcome) in &report.peers {
                    println!("  {peer}: {outcome}");
                    failed |= outcome != "ok";
                }
                if let Some(bucket) = &report.bucket {
                    println!("  bucket: {bucket}");
                }
                // With bucket membership, a peer not reached reads the
                // record once it runs.
                let recorded = report.bucket.as_deref() == Some("recorded");
                if failed && !recorded {
                    return Err(
                        "some peers were not reached; run the command again once they are up"
                            .to_owned(),
                    );
                }
                Ok(())
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
