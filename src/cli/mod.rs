//! The client side of the `chunkbus` binary: `produce`, `consume`, `tail`,
//! `categories`, `status`, `top`. Each talks HTTP through `chunkbus-client`.

pub mod consume;
pub mod produce;
mod progress;
pub mod ship;
mod tail;
pub mod top;

pub use consume::consume;
pub use produce::produce;
pub use ship::ship;
pub use tail::tail;
pub use top::top;

use chunkbus_client::Client;

use crate::config::ServerArgs;

/// The first server given (the CLI's commands that talk to one node), with
/// the token, if any.
pub fn first_client(args: &ServerArgs) -> Result<Client, String> {
    let url = args.servers.first().ok_or("no --server given")?;
    Client::with_tls(url, args.token()?.as_deref(), args.ca_pem()?.as_deref())
        .map_err(|e| e.to_string())
}

/// `chunkbus categories`: one name per line.
pub async fn categories(servers: &ServerArgs) -> Result<(), String> {
    for c in first_client(servers)?
        .categories()
        .await
        .map_err(|e| e.to_string())?
    {
        println!("{c}");
    }
    Ok(())
}

/// `chunkbus status`: the node's status as indented JSON.
pub async fn status(servers: &ServerArgs) -> Result<(), String> {
    let st = first_client(servers)?
        .status()
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "{}",
        serde_json::to_string_pretty(&st).map_err(|e| e.to_string())?
    );
    Ok(())
}
