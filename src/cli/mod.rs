//! The client side of the `chunkbus` binary: `produce`, `consume`, `tail`,
//! `categories`, `status`. Each talks HTTP through `chunkbus-client`.

pub mod consume;
pub mod produce;
pub mod ship;
mod tail;

pub use consume::consume;
pub use produce::produce;
pub use ship::ship;
pub use tail::tail;

use chunkbus_client::Client;

/// The first server given (the CLI's commands that talk to one node).
pub fn first_client(servers: &[String]) -> Result<Client, String> {
    let url = servers.first().ok_or("no --server given")?;
    Client::new(url).map_err(|e| e.to_string())
}

/// `chunkbus categories`: one name per line.
pub async fn categories(servers: &[String]) -> Result<(), String> {
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
pub async fn status(servers: &[String]) -> Result<(), String> {
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
