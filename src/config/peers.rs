//! `--peers eu1=10.0.0.1:8080,eu2=10.0.0.2:8080`: the cluster's nodes.

use std::fmt;
use std::str::FromStr;

use chunkbus_client::names::validate_node;
use serde::Deserialize;

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its node name (owner of `<name>-chunk*`).
    pub name: String,
    /// `host:port` of its HTTP listener.
    pub addr: String,
}

/// The `--peers` list, validated: names valid and unique, addresses `host:port`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerList(pub Vec<Peer>);

impl FromStr for PeerList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let items: Vec<&str> = s
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .collect();
        Self::from_items(&items)
    }
}

impl PeerList {
    fn from_items(items: &[&str]) -> Result<Self, String> {
        let mut peers: Vec<Peer> = Vec::new();
        for item in items {
            let (name, addr) = item
                .split_once('=')
                .ok_or_else(|| format!("peer {item:?} must look like name=host:port"))?;
            let (name, addr) = (name.trim(), addr.trim());
            validate_node(name).map_err(|e| format!("peer {item:?}: {e}"))?;
            let port = addr
                .rsplit_once(':')
                .and_then(|(host, port)| (!host.is_empty()).then_some(port))
                .and_then(|p| p.parse::<u16>().ok());
            if port.is_none() {
                return Err(format!("peer {item:?}: the address must be host:port"));
            }
            if peers.iter().any(|p| p.name == name) {
                return Err(format!("peer name {name:?} appears twice in --peers"));
            }
            peers.push(Peer {
                name: name.to_owned(),
                addr: addr.to_owned(),
            });
        }
        Ok(Self(peers))
    }
}

impl fmt::Display for PeerList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self
            .0
            .iter()
            .map(|p| format!("{}={}", p.name, p.addr))
            .collect();
        f.write_str(&items.join(","))
    }
}

impl<'de> Deserialize<'de> for PeerList {
    /// A string like the flag, or an array of `name=host:port` strings.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        match Raw::deserialize(d)? {
            Raw::One(s) => s.parse().map_err(serde::de::Error::custom),
            Raw::Many(v) => {
                let items: Vec<&str> = v.iter().map(String::as_str).collect();
                PeerList::from_items(&items).map_err(serde::de::Error::custom)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let p: PeerList = "eu1=127.0.0.1:8080, eu2=host.example:8081".parse().unwrap();
        assert_eq!(p.0.len(), 2);
        assert_eq!(p.0[1].addr, "host.example:8081");
        assert_eq!(p.to_string(), "eu1=127.0.0.1:8080,eu2=host.example:8081");
        assert!("".parse::<PeerList>().unwrap().0.is_empty());
        for bad in [
            "eu1",
            "eu1=",
            "eu1=host",
            "e.u=h:1",
            "a=h:1,a=h:2",
            "a=:80",
            "a=h:99999",
        ] {
            assert!(bad.parse::<PeerList>().is_err(), "{bad}");
        }
        assert!(
            "a=h:1,a=h:2"
                .parse::<PeerList>()
                .unwrap_err()
                .contains("appears twice")
        );
    }
}
