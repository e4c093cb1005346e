//! The requests the Kafka listener serves, read with [`Reader`] (see
//! `wire` for why not with the protocol crate's decoders). Only the
//! versions in [`SUPPORTED`] are read; they are the ones ApiVersions
//! advertises, so clients never send others.

use bytes::Bytes;
use kafka_protocol::messages::ApiKey;

use super::wire::{Malformed, Reader};

/// The API keys served and their version ranges (inclusive). Non-flexible
/// versions only, except ApiVersions v3: every client in use negotiates
/// down to these (Kafka 4 clients included: they dropped only older ones).
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 8),
    (ApiKey::Fetch, 4, 11),
    (ApiKey::ListOffsets, 1, 5),
    (ApiKey::Metadata, 1, 8),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::InitProducerId, 0, 1),
    (ApiKey::FindCoordinator, 0, 2),
    (ApiKey::JoinGroup, 0, 5),
    (ApiKey::SyncGroup, 0, 3),
    (ApiKey::Heartbeat, 0, 3),
    (ApiKey::LeaveGroup, 0, 3),
    (ApiKey::OffsetCommit, 2, 7),
    (ApiKey::OffsetFetch, 1, 5),
];

/// The version range served for `key`, if any.
pub fn supported(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|&(_, lo, hi)| (lo, hi))
}

/// A request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
    pub client_id: Option<String>,
}

/// Reads the header of a request frame.
pub fn header(r: &mut Reader) -> Result<Header, Malformed> {
    let api_key = r.i16()?;
    let api_version = r.i16()?;
    let correlation_id = r.i32()?;
    let client_id = r.nullable_string()?;
    let h = Header {
        api_key,
        api_version,
        correlation_id,
        client_id,
    };
    if let Ok(key) = ApiKey::try_from(api_key)
        && supported(key).is_some()
        && key.request_header_version(api_version) >= 2
    {
        r.skip_tagged_fields()?;
    }
    Ok(h)
}

/// Metadata: which topics (all when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub topics: Option<Vec<String>>,
    pub allow_auto_topic_creation: bool,
}

pub fn metadata(r: &mut Reader, v: i16) -> Result<Metadata, Malformed> {
    let topics = match r.nullable_array_len()? {
        None => None,
        Some(n) => Some((0..n).map(|_| r.string()).collect::<Result<_, _>>()?),
    };
    let allow_auto_topic_creation = if v >= 4 { r.bool()? } else { true };
    if v >= 8 {
        r.bool()?;
        r.bool()?;
    }
    Ok(Metadata {
        topics,
        allow_auto_topic_creation,
    })
}

/// One partition's records in a produce request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducePartition {
    pub index: i32,
    pub records: Option<Bytes>,
}

/// Produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Produce {
    pub transactional_id: Option<String>,
    pub acks: i16,
    pub timeout_ms: i32,
    pub topics: Vec<(String, Vec<ProducePartition>)>,
}

pub fn produce(r: &mut Reader, _v: i16) -> Result<Produce, Malformed> {
    let transactional_id = r.nullable_string()?;
    let acks = r.i16()?;
    let timeout_ms = r.i32()?;
    let topics = per_topic(r, |r| {
        let index = r.i32()?;
        let records = r.nullable_bytes()?;
        Ok(ProducePartition { index, records })
    })?;
    Ok(Produce {
        transactional_id,
        acks,
        timeout_ms,
        topics,
    })
}

/// One partition of a fetch request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPartition {
    pub partition: i32,
    pub fetch_offset: i64,
    pub max_bytes: i32,
}

/// Fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    pub max_wait_ms: i32,
    pub min_bytes: i32,
    pub max_bytes: i32,
    pub topics: Vec<(String, Vec<FetchPartition>)>,
}

pub fn fetch(r: &mut Reader, v: i16) -> Result<Fetch, Malformed> {
    let _replica_id = r.i32()?;
    let max_wait_ms = r.i32()?;
    let min_bytes = r.i32()?;
    let max_bytes = r.i32()?;
    let _isolation = r.i8()?;
    if v >= 7 {
        let _session_id = r.i32()?;
        let _session_epoch = r.i32()?;
    }
    let topics = per_topic(r, |r| {
        let partition = r.i32()?;
        if v >= 9 {
            let _leader_epoch = r.i32()?;
        }
        let fetch_offset = r.i64()?;
        if v >= 5 {
            let _log_start = r.i64()?;
        }
        let max_bytes = r.i32()?;
        Ok(FetchPartition {
            partition,
            fetch_offset,
            max_bytes,
        })
    })?;
    if v >= 7 {
        // Forgotten topics (fetch sessions are not kept).
        per_topic(r, Reader::i32)?;
    }
    if v >= 11 {
        r.string()?;
    }
    Ok(Fetch {
        max_wait_ms,
        min_bytes,
        max_bytes,
        topics,
    })
}

/// ListOffsets: per topic, (partition, timestamp) pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOffsets {
    pub topics: Vec<(String, Vec<(i32, i64)>)>,
}

pub fn list_offsets(r: &mut Reader, v: i16) -> Result<ListOffsets, Malformed> {
    let _replica_id = r.i32()?;
    if v >= 2 {
        let _isolation = r.i8()?;
    }
    let topics = per_topic(r, |r| {
        let partition = r.i32()?;
        if v >= 4 {
            let _leader_epoch = r.i32()?;
        }
        Ok((partition, r.i64()?))
    })?;
    Ok(ListOffsets { topics })
}

/// The array of topics most requests carry: each a name and an array of
/// partitions, each read by `partition`.
fn per_topic<T>(
    r: &mut Reader,
    mut partition: impl FnMut(&mut Reader) -> Result<T, Malformed>,
) -> Result<Vec<(String, Vec<T>)>, Malformed> {
    let mut topics = Vec::new();
    for _ in 0..r.array_len()? {
        let name = r.string()?;
        let mut parts = Vec::new();
        for _ in 0..r.array_len()? {
            parts.push(partition(r)?);
        }
        topics.push((name, parts));
    }
    Ok(topics)
}

/// InitProducerId: the transactional id (transactions are refused).
pub fn init_producer_id(r: &mut Reader, _v: i16) -> Result<Option<String>, Malformed> {
    let transactional_id = r.nullable_string()?;
    let _transaction_timeout_ms = r.i32()?;
    Ok(transactional_id)
}

/// FindCoordinator: the key (a group id) and its type (0 = group).
pub fn find_coordinator(r: &mut Reader, v: i16) -> Result<(String, i8), Malformed> {
    let key = r.string()?;
    let key_type = if v >= 1 { r.i8()? } else { 0 };
    Ok((key, key_type))
}

/// JoinGroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinGroup {
    pub group_id: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub protocol_type: String,
    /// (name, metadata), in the member's order of preference.
    pub protocols: Vec<(String, Bytes)>,
}

pub fn join_group(r: &mut Reader, v: i16) -> Result<JoinGroup, Malformed> {
    let group_id = r.string()?;
    let session_timeout_ms = r.i32()?;
    let rebalance_timeout_ms = if v >= 1 { r.i32()? } else { session_timeout_ms };
    let member_id = r.string()?;
    let group_instance_id = if v >= 5 { r.nullable_string()? } else { None };
    let protocol_type = r.string()?;
    let mut protocols = Vec::new();
    for _ in 0..r.array_len()? {
        let name = r.string()?;
        let metadata = r.nullable_bytes()?.unwrap_or_default();
        protocols.push((name, metadata));
    }
    Ok(JoinGroup {
        group_id,
        session_timeout_ms,
        rebalance_timeout_ms,
        member_id,
        group_instance_id,
        protocol_type,
        protocols,
    })
}

/// SyncGroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncGroup {
    pub group_id: String,
    pub generation_id: i32,
    pub member_id: String,
    /// Sent by the leader: (member id, assignment).
    pub assignments: Vec<(String, Bytes)>,
}

pub fn sync_group(r: &mut Reader, v: i16) -> Result<SyncGroup, Malformed> {
    let group_id = r.string()?;
    let generation_id = r.i32()?;
    let member_id = r.string()?;
    if v >= 3 {
        r.nullable_string()?;
    }
    let mut assignments = Vec::new();
    for _ in 0..r.array_len()? {
        let member = r.string()?;
        let assignment = r.nullable_bytes()?.unwrap_or_default();
        assignments.push((member, assignment));
    }
    Ok(SyncGroup {
        group_id,
        generation_id,
        member_id,
        assignments,
    })
}

/// Heartbeat: (group id, generation, member id).
pub fn heartbeat(r: &mut Reader, v: i16) -> Result<(String, i32, String), Malformed> {
    let group_id = r.string()?;
    let generation_id = r.i32()?;
    let member_id = r.string()?;
    if v >= 3 {
        r.nullable_string()?;
    }
    Ok((group_id, generation_id, member_id))
}

/// LeaveGroup: the group id and the members leaving.
pub fn leave_group(r: &mut Reader, v: i16) -> Result<(String, Vec<String>), Malformed> {
    let group_id = r.string()?;
    if v < 3 {
        return Ok((group_id, vec![r.string()?]));
    }
    let mut members = Vec::new();
    for _ in 0..r.array_len()? {
        members.push(r.string()?);
        r.nullable_string()?;
    }
    Ok((group_id, members))
}

/// OffsetCommit: per topic, (partition, offset) pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetCommit {
    pub group_id: String,
    pub generation_id: i32,
    pub member_id: String,
    pub topics: Vec<(String, Vec<(i32, i64)>)>,
}

pub fn offset_commit(r: &mut Reader, v: i16) -> Result<OffsetCommit, Malformed> {
    let group_id = r.string()?;
    let generation_id = r.i32()?;
    let member_id = r.string()?;
    if v >= 7 {
        r.nullable_string()?;
    }
    if v <= 4 {
        let _retention_time_ms = r.i64()?;
    }
    let topics = per_topic(r, |r| {
        let partition = r.i32()?;
        let offset = r.i64()?;
        if v >= 6 {
            let _leader_epoch = r.i32()?;
        }
        let _metadata = r.nullable_string()?;
        Ok((partition, offset))
    })?;
    Ok(OffsetCommit {
        group_id,
        generation_id,
        member_id,
        topics,
    })
}

/// OffsetFetch: the group and, per topic, the partitions (all topics the
/// group has positions in when `None`).
pub type OffsetFetch = (String, Option<Vec<(String, Vec<i32>)>>);

pub fn offset_fetch(r: &mut Reader, _v: i16) -> Result<OffsetFetch, Malformed> {
    let group_id = r.string()?;
    let topics = match r.nullable_array_len()? {
        None => None,
        Some(n) => {
            let mut topics = Vec::new();
            for _ in 0..n {
                let name = r.string()?;
                let mut parts = Vec::new();
                for _ in 0..r.array_len()? {
                    parts.push(r.i32()?);
                }
                topics.push((name, parts));
            }
            Some(topics)
        }
    };
    Ok((group_id, topics))
}

/// ApiVersions v3 carries the client's name and version.
pub fn api_versions(r: &mut Reader, v: i16) -> Result<(), Malformed> {
    if v >= 3 {
        r.compact_string()?;
        r.compact_string()?;
        r.skip_tagged_fields()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame kept as a fuzz seed (its bytes written by another encoder).
    fn seed(name: &str) -> Reader {
        let path = format!(
            "{}/fuzz/regressions/kafka/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        Reader::new(Bytes::from(std::fs::read(path).unwrap()))
    }

    #[test]
    fn the_seed_frames_read_as_written() {
        let mut r = seed("produce-plain");
        let h = header(&mut r).unwrap();
        assert_eq!((h.api_key, h.api_version, h.correlation_id), (0, 3, 1));
        let p = produce(&mut r, 3).unwrap();
        assert_eq!((p.acks, p.topics.len()), (1, 1));
        let records = p.topics[0].1[0].records.clone().unwrap();
        let p = crate::kafka::records::produced_lines(records, 1 << 20, 100).unwrap();
        assert_eq!((&p.lines[..], p.count), (&b"one\ntwo\n\n"[..], 3));

        let mut r = seed("fetch-v11");
        let h = header(&mut r).unwrap();
        let f = fetch(&mut r, h.api_version).unwrap();
        assert_eq!((f.max_wait_ms, f.topics[0].0.as_str()), (500, "app"));
        assert_eq!(f.topics[0].1[0].fetch_offset, 5);
        assert_eq!(r.remaining(), 0);

        let mut r = seed("list-offsets");
        let h = header(&mut r).unwrap();
        let l = list_offsets(&mut r, h.api_version).unwrap();
        assert_eq!(l.topics, [("app".to_owned(), vec![(0, -1)])]);

        let mut r = seed("api-versions-v3");
        let h = header(&mut r).unwrap();
        api_versions(&mut r, h.api_version).unwrap();
        assert_eq!(r.remaining(), 0);

        let mut r = seed("metadata-huge-count");
        let h = header(&mut r).unwrap();
        let e = metadata(&mut r, h.api_version).unwrap_err();
        assert!(e.0.contains("claims 2147483647"), "{e}");
    }
}
