//! What the Kafka listener answers, API by API.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chunkbus_client::ChunkName;
use chunkbus_client::names::{validate_category, validate_consumer};
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponsePartition, OffsetFetchResponseTopic,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, BrokerId, FetchResponse, FindCoordinatorResponse,
    HeartbeatResponse, InitProducerIdResponse, JoinGroupResponse, LeaveGroupResponse,
    ListOffsetsResponse, MetadataResponse, OffsetCommitResponse, OffsetFetchResponse,
    ProduceResponse, ProducerId, ResponseHeader, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::{Encodable, StrBytes};
use tokio_util::sync::CancellationToken;

use super::groups::{self, Groups, Join};
use super::landmarks::Landmarks;
use super::producers::{self, Check, Producers};
use super::records::{self, BatchError};
use super::requests::{self, FetchPartition, Header, ProducePartition};
use super::wire::Reader;
use crate::config::KafkaSettings;
use crate::consumers::position::Position;
use crate::http::AppState;
use crate::http::body::Reservation;
use crate::metrics::KafkaLabels;
use crate::replication::PartitionOrder;
use crate::storage::producers::{KAFKA_PRODUCER_PREFIX, ProducerTag};
use crate::storage::{ChunkStatus, StorageError};

/// Kafka error codes used here.
mod code {
    pub const NONE: i16 = 0;
    pub const OFFSET_OUT_OF_RANGE: i16 = 1;
    pub const CORRUPT_MESSAGE: i16 = 2;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub const LEADER_NOT_AVAILABLE: i16 = 5;
    pub const NOT_LEADER_OR_FOLLOWER: i16 = 6;
    pub const REQUEST_TIMED_OUT: i16 = 7;
    pub const MESSAGE_TOO_LARGE: i16 = 10;
    pub const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const NOT_COORDINATOR: i16 = 16;
    pub const INVALID_TOPIC_EXCEPTION: i16 = 17;
    pub const NOT_ENOUGH_REPLICAS_AFTER_APPEND: i16 = 20;
    pub const UNSUPPORTED_VERSION: i16 = 35;
    pub const UNSUPPORTED_FOR_MESSAGE_FORMAT: i16 = 43;
    pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
    pub const DUPLICATE_SEQUENCE_NUMBER: i16 = 46;
    pub const INVALID_PRODUCER_EPOCH: i16 = 47;
    pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;
    pub const KAFKA_STORAGE_ERROR: i16 = 56;
    pub const UNSUPPORTED_COMPRESSION_TYPE: i16 = 76;
    pub const INVALID_RECORD: i16 = 87;
}

/// Bytes scanned per step while finding where a line starts in a chunk.
const LOCATE_STEP_BYTES: u64 = 1 << 20;
/// Longest a commit waits for the lines it names to reach this node.
const COMMIT_WAIT: Duration = Duration::from_secs(5);
/// Longest `max_wait_ms` honoured.
const MAX_FETCH_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(super) struct Broker {
    pub st: Arc<AppState>,
    settings: KafkaSettings,
    /// Partition `p` is the lines of `order[p]` (fixed by `--peers`;
    /// learned from the bucket with bucket membership).
    order: Arc<PartitionOrder>,
    /// Where clients reach this node.
    advertised: String,
    /// This node's partition number.
    me: i32,
    /// Idempotent producers writing this node's partition.
    producers: Producers,
    /// The consumer groups this node coordinates.
    pub groups: Groups,
    /// Line starts found in chunks so far.
    landmarks: Landmarks,
}

/// What one connection remembers between requests: where the line after
/// its last fetch of each partition starts, so that a consumer reading on
/// does not scan its chunk again; and whether it is a producer's.
#[derive(Debug, Default)]
pub(super) struct Connection {
    cursors: HashMap<(String, i32), Cursor>,
    /// A Produce or InitProducerId came through it.
    producer: bool,
}

#[derive(Debug, Clone)]
struct Cursor {
    line: u64,
    chunk: ChunkName,
    byte: u64,
}

/// A partition as this node holds it: the owner's chunks here.
#[derive(Debug)]
struct Partition {
    chunks: Vec<ChunkStatus>,
    /// Number of the first line still held (retention deleted those below).
    log_start: u64,
    /// Number of the line after the last one held here; with no chunk held
    /// (retention deleted them all), the owner's next number as recorded
    /// here, which is then the log start too: an empty log does not go
    /// back to 0.
    end: u64,
}

impl Broker {
    pub fn new(st: Arc<AppState>, settings: KafkaSettings) -> Self {
        let order = st
            .kafka_nodes
            .clone()
            .unwrap_or_else(|| Arc::new(PartitionOrder::new(settings.nodes.clone())));
        let me = order
            .get()
            .iter()
            .position(|n| n == st.storage.node())
            .unwrap_or(0) as i32;
        let advertised = settings.advertised.clone().unwrap_or_default();
        Self {
            st,
            settings,
            order,
            advertised,
            me,
            producers: Producers::default(),
            groups: Groups::default(),
            landmarks: Landmarks::default(),
        }
    }

    /// Answers one request frame with a whole response frame (length
    /// first); `None` for a produce with `acks=0`.
    /// An error closes the connection (an unknown API, a malformed frame).
    pub async fn handle(
        &self,
        conn: &mut Connection,
        frame: Bytes,
        reservation: &mut Reservation,
        shutdown: &CancellationToken,
    ) -> Result<Option<Bytes>, String> {
        let mut r = Reader::new(frame);
        let h = requests::header(&mut r).map_err(|e| e.to_string())?;
        let key =
            ApiKey::try_from(h.api_key).map_err(|_| format!("unknown API key {}", h.api_key))?;
        let Some((lo, hi)) = requests::supported(key) else {
            return Err(format!("{key:?} is not served (see docs/kafka.md)"));
        };
        self.st
            .metrics
            .kafka_requests
            .get_or_create(&KafkaLabels { api: api_name(key) })
            .inc();
        let v = h.api_version;
        if !(lo..=hi).contains(&v) {
            if key == ApiKey::ApiVersions {
                // Answered in version 0, so the client learns what is served.
                return Ok(Some(self.api_versions(&h, 0, code::UNSUPPORTED_VERSION)?));
            }
            return Err(format!("{key:?} v{v} is not served (v{lo}-v{hi})"));
        }
        let bad = |e: super::wire::Malformed| format!("{key:?} v{v}: {e}");
        match key {
            ApiKey::ApiVersions => {
                requests::api_versions(&mut r, v).map_err(bad)?;
                Ok(Some(self.api_versions(&h, v, code::NONE)?))
            }
            ApiKey::Metadata => {
                let req = requests::metadata(&mut r, v).map_err(bad)?;
                let resp = self.metadata(req, conn.producer);
                encode(&h, key, v, &resp).map(Some)
            }
            ApiKey::Produce => {
                let req = requests::produce(&mut r, v).map_err(bad)?;
                conn.producer = true;
                let acks = req.acks;
                let resp = self.produce(req, reservation).await;
                if acks == 0 {
                    return Ok(None);
                }
                encode(&h, key, v, &resp).map(Some)
            }
            ApiKey::Fetch => {
                let req = requests::fetch(&mut r, v).map_err(bad)?;
                let resp = self.fetch(conn, req, shutdown).await;
                encode(&h, key, v, &resp).map(Some)
            }
            ApiKey::ListOffsets => {
                let req = requests::list_offsets(&mut r, v).map_err(bad)?;
                let resp = self.list_offsets(req);
                encode(&h, key, v, &resp).map(Some)
            }
            ApiKey::FindCoordinator => {
                let (group, key_type) = requests::find_coordinator(&mut r, v).map_err(bad)?;
                let mut resp = FindCoordinatorResponse::default();
                if key_type != 0 {
                    resp.error_code = code::COORDINATOR_NOT_AVAILABLE;
                    resp.error_message =
                        Some(StrBytes::from_static_str("transactions are not supported"));
                    resp.node_id = BrokerId(-1);
                } else {
                    let (id, addr) = self.coordinator(&group);
                    let (host, port) = split_addr(&addr);
                    resp.node_id = BrokerId(id);
                    resp.host = StrBytes::from_string(host);
                    resp.port = port;
                }
                encode(&h, key, v, &resp).map(Some)
            }
            ApiKey::JoinGroup => {
                let req = requests::join_group(&mut r, v).map_err(bad)?;
                let resp = self.join_group(&h, req, shutdown).await;
                encode(&h, key, v, &resp).map(Some)
            }
            ApiKey::SyncGroup => {
                let req = requests::sync_group(&mut r, v).map_err(bad)?;
                let mut resp = SyncGroupResponse::default();
                resp.error_code = self.group_error(&req.group_id);
                if resp.error_code == code::NONE {
                    let (error, assignment) = self
                        .groups
                        .sync(
                            &req.group_id,
                            req.generation_id,
                            &req.member_id,
                            req.assignments,
                            shutdown,
                        )
                        .await;
                    resp.error_code = error;
                    resp.assignment = assignment;
                }
                encode(&h, key, v, &resp).map(Some)
            }
            ApiKey::Heartbeat => {
                let (group, generation, member) = requests::heartbeat(&mut r, v).map_err(bad)?;
                let mut resp = HeartbeatResponse::default();
                resp.error_code = self.group_error(&group);
                if resp.error_code == code::NONE {
                    resp.error_code = self.groups.heartbeat(&group, generation, &member);
                }
                encode(&h, key, v, &resp).map(Some)
            }
            ApiKey::LeaveGroup => {
                let (group, members) = requests::leave_group(&mut r, v).map_err(bad)?;
                let mut resp = LeaveGroupResponse::default();
                resp.error_code = self.group_error(&group);
                if resp.error_code == code::NONE {
                    let codes = self.groups.leave(&group, &members);
                    if v < 3 {
                        // One member, answered in the top-level code.
                        resp.error_code = codes[0];
                        return encode(&h, key, v, &resp).map(Some);
                    }
                    for (id, error) in members.into_iter().zip(codes) {
                        let mut m = MemberResponse::default();
                        m.member_id = StrBytes::from_string(id);
                        m.error_code = error;
                        resp.members.push(m);
                    }
                }
                encode(&h, key, v, &resp).map(Some)
            }
            ApiKey::OffsetCommit => {
                let req = requests::offset_commit(&mut r, v).map_err(bad)?;
                let resp = self.offset_commit(req).await;
                encode(&h, key, v, &resp).map(Some)
            }
            ApiKey::OffsetFetch => {
                let req = requests::offset_fetch(&mut r, v).map_err(bad)?;
                let resp = self.offset_fetch(req).await;
                encode(&h, key, v, &resp).map(Some)
            }
            ApiKey::InitProducerId => {
                let transactional = requests::init_producer_id(&mut r, v).map_err(bad)?;
                conn.producer = true;
                let mut resp = InitProducerIdResponse::default();
                if transactional.is_some() {
                    resp.error_code = code::TRANSACTIONAL_ID_AUTHORIZATION_FAILED;
                    resp.producer_id = ProducerId(-1);
                    resp.producer_epoch = -1;
                } else {
                    resp.producer_id = ProducerId(producers::new_producer_id());
                    resp.producer_epoch = 0;
                }
                encode(&h, key, v, &resp).map(Some)
            }
            other => Err(format!("{other:?} is not served")),
        }
    }

    fn api_versions(&self, h: &Header, v: i16, error: i16) -> Result<Bytes, String> {
        let mut resp = ApiVersionsResponse::default();
        resp.error_code = error;
        for &(key, lo, hi) in requests::SUPPORTED {
            let mut a = ApiVersion::default();
            a.api_key = key as i16;
            a.min_version = lo;
            a.max_version = hi;
            resp.api_keys.push(a);
        }
        encode(h, ApiKey::ApiVersions, v, &resp)
    }

    /// The owner of partition `p`, if there is such a partition.
    fn owner(&self, p: i32) -> Option<String> {
        let order = self.order.get();
        usize::try_from(p)
            .ok()
            .and_then(|i| order.get(i))
            .filter(|n| !n.is_empty())
            .cloned()
    }

    /// Every node in partition order: whether this node sees it up (it
    /// answers and its Kafka address is known), and where clients reach
    /// it. A peer whose address is not known yet is given this node's:
    /// clients must know every broker a partition names.
    ///
    /// A peer that numbers partitions in another order (its `--peers`
    /// differs) is never up: naming it would send clients to a node
    /// where partition `p` is someone else's lines.
    fn nodes(&self) -> Vec<(bool, String)> {
        let order = self.order.get();
        order
            .iter()
            .map(|node| {
                if node == self.st.storage.node() {
                    return (true, self.advertised.clone());
                }
                let Some(peer) = self.st.replication.peer_kafka(node) else {
                    return (false, self.advertised.clone());
                };
                let agrees = peer.agrees(&order);
                let up = peer.connected && agrees && peer.addr.is_some();
                (up, peer.addr.unwrap_or_else(|| self.advertised.clone()))
            })
            .collect()
    }

    /// The coordinator of `group`: of the nodes up, the one whose name
    /// hashed with the group's scores highest (rendezvous hashing), so
    /// every node that sees the same nodes up names the same one, and a
    /// node going down moves only its own groups.
    fn coordinator(&self, group: &str) -> (i32, String) {
        let nodes = self.nodes();
        let score = |name: &str| {
            let mut key = Vec::with_capacity(name.len() + group.len() + 1);
            key.extend_from_slice(name.as_bytes());
            key.push(0);
            key.extend_from_slice(group.as_bytes());
            crc32c::crc32c(&key)
        };
        self.order
            .get()
            .iter()
            .zip(nodes)
            .enumerate()
            .filter(|(_, (_, (up, _)))| *up)
            .max_by_key(|(_, (name, _))| score(name))
            .map(|(i, (_, (_, addr)))| (i as i32, addr))
            .unwrap_or((self.me, self.advertised.clone()))
    }

    /// The error for a group request sent here: the id must name a
    /// chunkbus consumer, and this node must be its coordinator.
    fn group_error(&self, group: &str) -> i16 {
        if validate_consumer(group).is_err() {
            return groups::code::INVALID_GROUP_ID;
        }
        if self.coordinator(group).0 != self.me {
            return code::NOT_COORDINATOR;
        }
        code::NONE
    }

    async fn join_group(
        &self,
        h: &Header,
        req: requests::JoinGroup,
        shutdown: &CancellationToken,
    ) -> JoinGroupResponse {
        let mut resp = JoinGroupResponse::default();
        resp.member_id = StrBytes::from_string(req.member_id.clone());
        resp.generation_id = -1;
        resp.error_code = self.group_error(&req.group_id);
        if resp.error_code != code::NONE {
            return resp;
        }
        let join = Join {
            group_id: &req.group_id,
            member_id: &req.member_id,
            client_id: h.client_id.as_deref().unwrap_or("kafka"),
            session_timeout_ms: req.session_timeout_ms,
            rebalance_timeout_ms: req.rebalance_timeout_ms,
            protocol_type: &req.protocol_type,
            protocols: &req.protocols,
        };
        let a = self.groups.join(join, shutdown).await;
        resp.error_code = a.error;
        resp.generation_id = a.generation;
        resp.protocol_name = Some(StrBytes::from_string(a.protocol));
        resp.leader = StrBytes::from_string(a.leader);
        resp.member_id = StrBytes::from_string(a.member_id);
        for (id, metadata) in a.members {
            let mut m = JoinGroupResponseMember::default();
            m.member_id = StrBytes::from_string(id);
            m.metadata = metadata;
            resp.members.push(m);
        }
        resp
    }

    /// Commits are chunkbus consumer positions: group `g` is consumer `g`,
    /// and offset `n` of partition `p` is where line `n` of the `p`-th
    /// node starts.
    async fn offset_commit(&self, req: requests::OffsetCommit) -> OffsetCommitResponse {
        let group = &req.group_id;
        let mut error = self.group_error(group);
        if error == code::NOT_COORDINATOR && req.generation_id < 0 {
            // A consumer outside any group may commit through any node.
            error = code::NONE;
        }
        if error == code::NONE {
            error = self
                .groups
                .check_commit(group, req.generation_id, &req.member_id);
        }
        let mut resp = OffsetCommitResponse::default();
        // One wait for the whole request, however many partitions it names.
        let deadline = tokio::time::Instant::now() + COMMIT_WAIT;
        for (topic, parts) in req.topics {
            let mut t = OffsetCommitResponseTopic::default();
            t.name = TopicName(StrBytes::from_string(topic.clone()));
            for (p, offset) in parts {
                let mut pr = OffsetCommitResponsePartition::default();
                pr.partition_index = p;
                pr.error_code = match error {
                    code::NONE => self.commit(group, &topic, p, offset, deadline).await,
                    e => e,
                };
                t.partitions.push(pr);
            }
            resp.topics.push(t);
        }
        resp
    }

    /// Moves consumer `group`'s position in `owner`'s lines of `topic` to
    /// where line `line` starts; backwards too (in a new generation, as a
    /// rewind does), since a Kafka consumer may commit an earlier offset.
    async fn commit(
        &self,
        group: &str,
        topic: &str,
        p: i32,
        line: i64,
        deadline: tokio::time::Instant,
    ) -> i16 {
        let Some(owner) = self.owner(p) else {
            return code::UNKNOWN_TOPIC_OR_PARTITION;
        };
        let owner = owner.as_str();
        if validate_category(topic).is_err() {
            return code::UNKNOWN_TOPIC_OR_PARTITION;
        }
        let Ok(line) = u64::try_from(line) else {
            return code::NONE;
        };
        let (index, byte) = loop {
            let mut watch = self.st.storage.watch(topic);
            if let Some(w) = &mut watch {
                w.borrow_and_update();
            }
            match self.position_of(topic, owner, line).await {
                Ok(Some(at)) => break at,
                Ok(None) if line == 0 => return code::NONE,
                // No line is held (retention deleted every chunk): the
                // position is the end, wherever it was stored.
                Ok(None)
                    if self
                        .partition(topic, owner)
                        .chunks
                        .is_empty()
                        .then(|| self.st.storage.line_end_of(topic, owner))
                        .flatten()
                        .is_some_and(|end| line <= end) =>
                {
                    return code::NONE;
                }
                Ok(None) => {}
                Err(e) => return storage_code(&e),
            }
            // The lines are not here yet: wait for replication a little.
            let Some(mut w) = watch else {
                return code::COORDINATOR_LOAD_IN_PROGRESS;
            };
            tokio::select! {
                r = w.changed() => if r.is_err() { return code::COORDINATOR_LOAD_IN_PROGRESS },
                _ = tokio::time::sleep_until(deadline) => {
                    return code::COORDINATOR_LOAD_IN_PROGRESS;
                }
            }
        };
        let stored = self
            .st
            .consumers
            .update(topic, group, |e| {
                let g = e.generation();
                let ahead = e
                    .positions
                    .get(owner)
                    .is_some_and(|cur| (cur.index, cur.offset) > (index, byte));
                let p = Position {
                    generation: if ahead { g + 1 } else { g },
                    index,
                    offset: byte,
                };
                e.raise(owner, p)
            })
            .await;
        match stored {
            Ok(_) => code::NONE,
            Err(e) => storage_code(&e),
        }
    }

    /// Where line `line` of `owner`'s lines of `topic` starts, as a chunk
    /// index and byte offset; `None` when this node does not hold it (yet).
    /// A line below those held maps to the first held.
    async fn position_of(
        &self,
        topic: &str,
        owner: &str,
        line: u64,
    ) -> Result<Option<(u32, u64)>, StorageError> {
        let part = self.partition(topic, owner);
        let Some(first) = part.chunks.first() else {
            return Ok(None);
        };
        if line <= part.log_start {
            return Ok(Some((first.name.index, 0)));
        }
        for c in &part.chunks {
            let (Some(start), Some(lines)) = (c.meta.first_line, c.meta.lines) else {
                continue;
            };
            if line < start || line > start + lines {
                continue;
            }
            if line == start + lines {
                if c.meta.complete {
                    // The next chunk's start (it may not exist yet).
                    continue;
                }
                return Ok(Some((c.name.index, c.meta.size)));
            }
            let byte = self.locate(topic, &c.name, line - start).await?;
            return Ok(Some((c.name.index, byte)));
        }
        // Just past a complete chunk: the start of the one after it.
        Ok(part
            .chunks
            .iter()
            .find(|c| c.meta.complete && c.meta.line_record().map(|r| r.end()) == Some(line))
            .map(|c| (c.name.index + 1, 0)))
    }

    /// The line number a consumer position stands at: the number of the
    /// first line it has not passed.
    async fn line_of(
        &self,
        topic: &str,
        owner: &str,
        pos: &Position,
    ) -> Result<Option<u64>, StorageError> {
        let part = self.partition(topic, owner);
        if let Some(c) = part.chunks.iter().find(|c| c.name.index == pos.index) {
            let Some(start) = c.meta.first_line else {
                return Ok(None);
            };
            if pos.offset == 0 {
                return Ok(Some(start));
            }
            if pos.offset >= c.meta.size
                && let Some(lines) = c.meta.lines
            {
                return Ok(Some(start + lines));
            }
            let n = self.count_lines(topic, &c.name, pos.offset).await?;
            return Ok(Some(start + n));
        }
        // The chunk is gone (deleted) or not made yet. A position within
        // it (an ack stays at the end of a complete chunk it passed) stands
        // at the next chunk's start when there is one.
        let next_start = part
            .chunks
            .iter()
            .find(|c| c.name.index > pos.index)
            .and_then(|c| c.meta.first_line);
        if pos.offset > 0 && next_start.is_some() {
            return Ok(next_start);
        }
        // Else past the last chunk before it, or before everything held.
        if let Some(c) = part
            .chunks
            .iter()
            .rev()
            .find(|c| c.name.index < pos.index && c.meta.complete)
        {
            return Ok(c.meta.line_record().map(|r| r.end()));
        }
        // Nothing held (retention deleted every chunk): at the end.
        if part.chunks.is_empty() {
            return Ok(Some(part.end));
        }
        Ok(next_start)
    }

    async fn offset_fetch(&self, (group, topics): requests::OffsetFetch) -> OffsetFetchResponse {
        let mut resp = OffsetFetchResponse::default();
        if validate_consumer(&group).is_err() {
            resp.error_code = groups::code::INVALID_GROUP_ID;
            return resp;
        }
        let all = self.order.get().len() as i32;
        let topics = topics.unwrap_or_else(|| {
            self.st
                .storage
                .categories()
                .into_iter()
                .filter(|c| {
                    self.st
                        .consumers
                        .get(c, &group)
                        .is_some_and(|e| e.is_live())
                })
                .map(|c| (c, (0..all).collect()))
                .collect()
        });
        for (topic, parts) in topics {
            let mut t = OffsetFetchResponseTopic::default();
            t.name = TopicName(StrBytes::from_string(topic.clone()));
            let entry = self.st.consumers.get(&topic, &group);
            for p in parts {
                let mut pr = OffsetFetchResponsePartition::default();
                pr.partition_index = p;
                pr.committed_offset = -1;
                pr.committed_leader_epoch = -1;
                pr.metadata = Some(StrBytes::default());
                let owner = self.owner(p);
                let owner = owner.as_deref();
                let pos = owner.and_then(|o| entry.as_ref()?.positions.get(o).copied());
                if let (Some(owner), Some(pos)) = (owner, pos) {
                    match self.line_of(&topic, owner, &pos).await {
                        Ok(Some(line)) => pr.committed_offset = line as i64,
                        Ok(None) => {}
                        Err(e) => pr.error_code = storage_code(&e),
                    }
                }
                t.partitions.push(pr);
            }
            resp.topics.push(t);
        }
        resp
    }

    /// The brokers and partitions. A partition whose owner does not answer
    /// is named led by this node, so that consumers go on reading it from
    /// the copies here; but on a producer's connection it is named without
    /// a leader, since only its owner can store its lines: Kafka clients
    /// then send records without a key to the partitions that have one.
    fn metadata(&self, req: requests::Metadata, producer: bool) -> MetadataResponse {
        let mut resp = MetadataResponse::default();
        let mut up = Vec::new();
        for (i, (reachable, addr)) in self.nodes().into_iter().enumerate() {
            up.push(reachable);
            let (host, port) = split_addr(&addr);
            let mut b = MetadataResponseBroker::default();
            b.node_id = BrokerId(i as i32);
            b.host = StrBytes::from_string(host);
            b.port = port;
            resp.brokers.push(b);
        }
        resp.cluster_id = Some(StrBytes::from_static_str("chunkbus"));
        resp.controller_id = BrokerId(self.me);
        let names = match req.topics {
            Some(t) => t,
            None => self.st.storage.categories(),
        };
        for name in names {
            let mut t = MetadataResponseTopic::default();
            t.name = Some(TopicName(StrBytes::from_string(name.clone())));
            if validate_category(&name).is_err() {
                t.error_code = code::INVALID_TOPIC_EXCEPTION;
                resp.topics.push(t);
                continue;
            }
            // Every valid name is a topic: a category exists once written.
            let all: Vec<BrokerId> = (0..up.len() as i32).map(BrokerId).collect();
            let isr: Vec<BrokerId> = all.iter().copied().filter(|b| up[b.0 as usize]).collect();
            for (p, &reachable) in up.iter().enumerate() {
                let mut part = MetadataResponsePartition::default();
                part.partition_index = p as i32;
                part.leader_id = BrokerId(match (reachable, producer) {
                    (true, _) => p as i32,
                    (false, false) => self.me,
                    (false, true) => {
                        part.error_code = code::LEADER_NOT_AVAILABLE;
                        -1
                    }
                });
                part.replica_nodes = all.clone();
                part.isr_nodes = isr.clone();
                t.partitions.push(part);
            }
            resp.topics.push(t);
        }
        resp
    }

    async fn produce(
        &self,
        mut req: requests::Produce,
        reservation: &mut Reservation,
    ) -> ProduceResponse {
        let mut resp = ProduceResponse::default();
        for (topic, parts) in std::mem::take(&mut req.topics) {
            let mut t = TopicProduceResponse::default();
            t.name = TopicName(StrBytes::from_string(topic.clone()));
            for part in parts {
                let index = part.index;
                let mut pr = PartitionProduceResponse::default();
                pr.index = index;
                pr.log_append_time_ms = -1;
                pr.log_start_offset = -1;
                match self
                    .produce_partition(&topic, part, &req, reservation)
                    .await
                {
                    Ok(base) => pr.base_offset = base as i64,
                    Err((code, message)) => {
                        pr.error_code = code;
                        pr.base_offset = -1;
                        pr.error_message = Some(StrBytes::from_string(message));
                    }
                }
                t.partition_responses.push(pr);
            }
            resp.responses.push(t);
        }
        resp
    }

    /// Stores one partition's records; returns the offset of the first.
    async fn produce_partition(
        &self,
        topic: &str,
        part: ProducePartition,
        req: &requests::Produce,
        reservation: &mut Reservation,
    ) -> Result<u64, (i16, String)> {
        if req.transactional_id.is_some() {
            return Err((
                code::TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                "transactions are not supported".into(),
            ));
        }
        validate_category(topic).map_err(|e| (code::INVALID_TOPIC_EXCEPTION, e.to_string()))?;
        match self.owner(part.index).as_deref() {
            None => {
                return Err((
                    code::UNKNOWN_TOPIC_OR_PARTITION,
                    format!("partition {} does not exist", part.index),
                ));
            }
            Some(owner) if owner != self.st.storage.node() => {
                return Err((
                    code::NOT_LEADER_OR_FOLLOWER,
                    format!("partition {} is written on node {owner}", part.index),
                ));
            }
            Some(_) => {}
        }
        let data = part.records.unwrap_or_default();
        let limits = &self.st.limits;
        if self.st.storage.disk().over_high_water() {
            self.st.metrics.shed_requests.inc();
            return Err((
                code::KAFKA_STORAGE_ERROR,
                "disk usage is above --disk-high-water; retry later".into(),
            ));
        }
        // What decoding may allocate is reserved first: the records' own
        // size when the batch is not compressed, --max-body-bytes when it is.
        let compressed = data.len() > 22 && i16::from_be_bytes([data[21], data[22]]) & 7 != 0;
        let budget = match compressed {
            true => limits.max_body_bytes,
            false => data.len() as u64,
        };
        reservation.grow(budget).map_err(|e| {
            self.st.metrics.shed_requests.inc();
            (code::KAFKA_STORAGE_ERROR, e.to_string())
        })?;
        let produced =
            records::produced_lines(data, budget, limits.max_line_bytes).map_err(|e| {
                let code = match &e {
                    BatchError::Corrupt(_) => code::CORRUPT_MESSAGE,
                    BatchError::OldFormat(_) => code::UNSUPPORTED_FOR_MESSAGE_FORMAT,
                    BatchError::Compression(_) => code::UNSUPPORTED_COMPRESSION_TYPE,
                    BatchError::InvalidRecord(_) => code::INVALID_RECORD,
                    BatchError::TooLarge(_) => code::MESSAGE_TOO_LARGE,
                };
                (code, e.to_string())
            })?;
        if produced.count == 0 {
            return Err((code::CORRUPT_MESSAGE, "no records".into()));
        }
        // An idempotent producer's state stays locked until its batch is
        // stored (or refused), so that a retry racing the first attempt
        // on another connection waits and is then seen as a duplicate.
        let state = produced
            .sequence
            .map(|s| self.producers.state(s.producer_id, topic));
        let mut state = match &state {
            Some(s) => Some(s.lock().await),
            None => None,
        };
        // What the storage records with an idempotent batch, so that a
        // retry after this node restarted (its memory of the producer
        // gone) is still found.
        let tag = produced.sequence.map(|s| durable_tag(&s, &produced.lines));
        if let (Some(state), Some(seq)) = (&mut state, &produced.sequence) {
            if !state.known() {
                self.restore(state, topic, seq.producer_id).await?;
            }
            match state.check(seq) {
                Check::Append => {}
                Check::Duplicate(line) => return Ok(line),
                Check::OldDuplicate => {
                    return Err((
                        code::DUPLICATE_SEQUENCE_NUMBER,
                        format!("sequence {} was stored before", seq.first),
                    ));
                }
                Check::OutOfOrder { expected } => {
                    return Err((
                        code::OUT_OF_ORDER_SEQUENCE_NUMBER,
                        format!("sequence {} where {expected} was expected", seq.first),
                    ));
                }
                Check::Fenced { current } => {
                    return Err((
                        code::INVALID_PRODUCER_EPOCH,
                        format!("epoch {} is older than {current}", seq.epoch),
                    ));
                }
            }
        }
        let sync = self.st.default_sync();
        let appended = self
            .st
            .storage
            .append_tagged(topic, vec![produced.lines], produced.count, sync, tag)
            .await
            .map_err(|e| (storage_code(&e), e.to_string()))?;
        if let (Some(state), Some(seq)) = (&mut state, &produced.sequence) {
            state.stored(seq, appended.first_line);
        }
        drop(state);
        if req.acks == -1 {
            // All replicas: as many other nodes as configured hold them
            // (with bucket membership, at most as many as there are).
            let want = if self.st.replication.bucket_membership() {
                let others = self.st.replication.other_holders() as u32;
                self.settings.acks_all_replicas.min(others)
            } else {
                self.settings.acks_all_replicas
            };
            if want > 0 {
                let timeout = Duration::from_millis(req.timeout_ms.max(0) as u64);
                let have = self
                    .st
                    .replication
                    .progress
                    .wait(topic, &appended.chunk, appended.next_offset, want, timeout)
                    .await;
                if have < want {
                    return Err((
                        code::NOT_ENOUGH_REPLICAS_AFTER_APPEND,
                        "stored on this node; no other node confirmed it in time".into(),
                    ));
                }
            }
        }
        Ok(appended.first_line)
    }

    /// What this node recorded of producer `id`'s batches of `topic` with
    /// their lines (kept across restarts, see `storage::producers`), into
    /// `state`: after a restart, or once the producer was forgotten, a
    /// batch stored before is still answered as a duplicate and a gap
    /// still refused. Each record is checked against the chunk first.
    async fn restore(
        &self,
        state: &mut producers::State,
        topic: &str,
        id: i64,
    ) -> Result<(), (i16, String)> {
        let storage_error = |e: StorageError| (storage_code(&e), e.to_string());
        let storage = &self.st.storage;
        let producer = durable_producer(id);
        let sequences = storage
            .producer_sequences(topic, &producer)
            .await
            .map_err(storage_error)?;
        for sequence in sequences {
            let Some(r) = storage
                .producer_lookup(topic, &producer, sequence)
                .await
                .map_err(storage_error)?
            else {
                continue;
            };
            let at = Position {
                generation: 0,
                index: r.chunk.index,
                offset: r.offset,
            };
            let Some(line) = self
                .line_of(topic, storage.node(), &at)
                .await
                .map_err(storage_error)?
            else {
                continue;
            };
            let (epoch, first) = ((sequence >> 32) as u16 as i16, sequence as u32 as i32);
            state.stored(
                &producers::Sequence::of_batch(id, epoch, first, r.lines),
                line,
            );
        }
        Ok(())
    }

    /// The lines of partition `p` of `topic` this node holds, by number.
    fn partition(&self, topic: &str, owner: &str) -> Partition {
        let chunks: Vec<ChunkStatus> = self
            .st
            .storage
            .chunks(topic)
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.name.owner == owner && c.meta.first_line.is_some())
            .collect();
        let recorded = || self.st.storage.line_end_of(topic, owner).unwrap_or(0);
        let log_start = chunks
            .iter()
            .filter_map(|c| c.meta.first_line)
            .min()
            .unwrap_or_else(recorded);
        let end = chunks
            .iter()
            .filter_map(|c| Some(c.meta.first_line? + c.meta.lines?))
            .max()
            .unwrap_or_else(recorded);
        Partition {
            chunks,
            log_start,
            end,
        }
    }

    fn list_offsets(&self, req: requests::ListOffsets) -> ListOffsetsResponse {
        let mut resp = ListOffsetsResponse::default();
        for (topic, parts) in req.topics {
            let mut t = ListOffsetsTopicResponse::default();
            t.name = TopicName(StrBytes::from_string(topic.clone()));
            for (p, timestamp) in parts {
                let mut pr = ListOffsetsPartitionResponse::default();
                pr.partition_index = p;
                pr.timestamp = -1;
                match self.owner(p).as_deref() {
                    None => pr.error_code = code::UNKNOWN_TOPIC_OR_PARTITION,
                    Some(owner) => {
                        let part = self.partition(&topic, owner);
                        pr.offset = match timestamp {
                            -2 => part.log_start as i64,
                            -1 => part.end as i64,
                            ts => {
                                // Chunk-level time: the first chunk created
                                // at or after `ts`.
                                match part.chunks.iter().find(|c| c.meta.created_ms as i64 >= ts) {
                                    Some(c) => {
                                        pr.timestamp = c.meta.created_ms as i64;
                                        c.meta.first_line.unwrap_or(0) as i64
                                    }
                                    None => -1,
                                }
                            }
                        };
                    }
                }
                t.partitions.push(pr);
            }
            resp.topics.push(t);
        }
        resp
    }

    async fn fetch(
        &self,
        conn: &mut Connection,
        req: requests::Fetch,
        shutdown: &CancellationToken,
    ) -> FetchResponse {
        let wait = Duration::from_millis(req.max_wait_ms.max(0) as u64).min(MAX_FETCH_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let max_total = req.max_bytes.max(1) as u64;
        loop {
            // Watch before reading, so that nothing appended in between is
            // missed.
            let mut watches: Vec<_> = req
                .topics
                .iter()
                .filter_map(|(t, _)| self.st.storage.watch(t))
                .collect();
            for w in &mut watches {
                w.borrow_and_update();
            }
            let mut resp = FetchResponse::default();
            let mut total = 0u64;
            for (topic, parts) in &req.topics {
                let mut t = FetchableTopicResponse::default();
                t.topic = TopicName(StrBytes::from_string(topic.clone()));
                for p in parts {
                    let budget = max_total.saturating_sub(total);
                    let pd = self.fetch_partition(conn, topic, p, budget).await;
                    total += pd.records.as_ref().map_or(0, |r| r.len() as u64);
                    t.partitions.push(pd);
                }
                resp.responses.push(t);
            }
            let now = tokio::time::Instant::now();
            if total >= req.min_bytes.max(1) as u64 || now >= deadline || shutdown.is_cancelled() {
                return resp;
            }
            // No category yet: nothing can wake this fetch but time.
            let changed = async {
                if watches.is_empty() {
                    std::future::pending::<()>().await;
                }
                let any = watches.iter_mut().map(|w| Box::pin(w.changed()));
                let _ = futures_util::future::select_all(any).await;
            };
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }

    async fn fetch_partition(
        &self,
        conn: &mut Connection,
        topic: &str,
        p: &FetchPartition,
        budget: u64,
    ) -> PartitionData {
        let mut pd = PartitionData::default();
        pd.partition_index = p.partition;
        pd.records = Some(Bytes::new());
        let Some(owner) = self.owner(p.partition) else {
            pd.error_code = code::UNKNOWN_TOPIC_OR_PARTITION;
            return pd;
        };
        let owner = owner.as_str();
        if validate_category(topic).is_err() {
            pd.error_code = code::UNKNOWN_TOPIC_OR_PARTITION;
            return pd;
        }
        let part = self.partition(topic, owner);
        pd.high_watermark = part.end as i64;
        pd.last_stable_offset = part.end as i64;
        pd.log_start_offset = part.log_start as i64;
        let offset = p.fetch_offset;
        let mine = owner == self.st.storage.node();
        if offset < 0 || (offset as u64) < part.log_start || (mine && offset as u64 > part.end) {
            // Below the log start, or past the owner's end. Past what a
            // copy holds is not an error: it catches up.
            pd.error_code = code::OFFSET_OUT_OF_RANGE;
            return pd;
        }
        let offset = offset as u64;
        if offset >= part.end || budget == 0 {
            return pd;
        }
        let Some(chunk) = part.chunks.iter().find(|c| {
            let first = c.meta.first_line.unwrap_or(u64::MAX);
            offset >= first && c.meta.lines.is_some_and(|n| offset < first + n)
        }) else {
            return pd;
        };
        let first = chunk.meta.first_line.unwrap_or(0);
        let key = (topic.to_owned(), p.partition);
        let start = match conn.cursors.get(&key) {
            Some(c) if c.line == offset && c.chunk == chunk.name => Ok(c.byte),
            _ => self.locate(topic, &chunk.name, offset - first).await,
        };
        let start = match start {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(topic, chunk = %chunk.name, error = %e, "kafka fetch cannot read a chunk");
                pd.error_code = code::KAFKA_STORAGE_ERROR;
                return pd;
            }
        };
        let max = (p.max_bytes.max(1) as u64).min(budget);
        let read = self
            .st
            .storage
            .read(
                topic,
                &chunk.name,
                start,
                max,
                Duration::ZERO,
                &CancellationToken::new(),
            )
            .await;
        let read = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(topic, chunk = %chunk.name, error = %e, "kafka fetch cannot read a chunk");
                pd.error_code = storage_code(&e);
                return pd;
            }
        };
        let mut out = BytesMut::new();
        let lines = records::encode_batch(
            &mut out,
            offset as i64,
            chunk.meta.created_ms as i64,
            &read.data,
        );
        // Where the next fetch (or a commit of this offset) starts.
        self.landmarks
            .note(topic, &chunk.name, offset + lines - first, read.next_offset);
        conn.cursors.insert(
            key,
            Cursor {
                line: offset + lines,
                chunk: chunk.name.clone(),
                byte: read.next_offset,
            },
        );
        pd.records = Some(out.freeze());
        pd
    }

    /// How many lines of `chunk` end before byte `upto`.
    async fn count_lines(
        &self,
        topic: &str,
        chunk: &ChunkName,
        upto: u64,
    ) -> Result<u64, StorageError> {
        let (mut n, mut at) = self.landmarks.at_or_before_byte(topic, chunk, upto);
        let never = CancellationToken::new();
        while at < upto {
            let step = LOCATE_STEP_BYTES.min(upto - at);
            let read = self
                .st
                .storage
                .read(topic, chunk, at, step, Duration::ZERO, &never)
                .await?;
            if read.data.is_empty() {
                break;
            }
            n += memchr::memchr_iter(b'\n', &read.data).count() as u64;
            at = read.next_offset;
        }
        if at == upto {
            // `upto` is a line boundary (a consumer position).
            self.landmarks.note(topic, chunk, n, upto);
        }
        Ok(n)
    }

    /// Where line `skip` (counted from 0) of `chunk` starts.
    async fn locate(&self, topic: &str, chunk: &ChunkName, skip: u64) -> Result<u64, StorageError> {
        let at = self.locate_from_landmark(topic, chunk, skip).await?;
        self.landmarks.note(topic, chunk, skip, at);
        Ok(at)
    }

    async fn locate_from_landmark(
        &self,
        topic: &str,
        chunk: &ChunkName,
        skip: u64,
    ) -> Result<u64, StorageError> {
        let (known, mut at) = self.landmarks.at_or_before_line(topic, chunk, skip);
        let mut left = skip - known;
        let never = CancellationToken::new();
        while left > 0 {
            let read = self
                .st
                .storage
                .read(topic, chunk, at, LOCATE_STEP_BYTES, Duration::ZERO, &never)
                .await?;
            if read.data.is_empty() {
                break;
            }
            let n = memchr::memchr_iter(b'\n', &read.data).count() as u64;
            if n <= left {
                left -= n;
                at = read.next_offset;
                continue;
            }
            let pos = memchr::memchr_iter(b'\n', &read.data)
                .nth(left as usize - 1)
                .map_or(0, |i| i + 1);
            return Ok(at + pos as u64);
        }
        Ok(at)
    }
}

/// The storage's record of an idempotent batch: producer `kafka.<id>`,
/// sequence = epoch (high 32 bits) and first sequence, and the CRC-32C of
/// the lines.
fn durable_tag(s: &producers::Sequence, lines: &[u8]) -> ProducerTag {
    ProducerTag {
        producer: durable_producer(s.producer_id),
        sequence: (u64::from(s.epoch as u16) << 32) | u64::from(s.first as u32),
        crc: crc32c::crc32c(lines),
    }
}

/// A Kafka producer id as a storage producer (the native API refuses ids
/// with this prefix).
fn durable_producer(id: i64) -> String {
    format!("{KAFKA_PRODUCER_PREFIX}{id}")
}

/// `host:port` split (port 9092 when missing or bad).
fn split_addr(addr: &str) -> (String, i32) {
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "9092"));
    (host.to_owned(), port.parse().unwrap_or(9092))
}

fn storage_code(e: &StorageError) -> i16 {
    match e {
        StorageError::UnknownCategory(_) | StorageError::UnknownChunk { .. } => {
            code::UNKNOWN_TOPIC_OR_PARTITION
        }
        StorageError::ShuttingDown => code::REQUEST_TIMED_OUT,
        _ => code::KAFKA_STORAGE_ERROR,
    }
}

fn api_name(key: ApiKey) -> &'static str {
    match key {
        ApiKey::Produce => "Produce",
        ApiKey::Fetch => "Fetch",
        ApiKey::ListOffsets => "ListOffsets",
        ApiKey::Metadata => "Metadata",
        ApiKey::ApiVersions => "ApiVersions",
        ApiKey::InitProducerId => "InitProducerId",
        ApiKey::FindCoordinator => "FindCoordinator",
        ApiKey::JoinGroup => "JoinGroup",
        ApiKey::SyncGroup => "SyncGroup",
        ApiKey::Heartbeat => "Heartbeat",
        ApiKey::LeaveGroup => "LeaveGroup",
        ApiKey::OffsetCommit => "OffsetCommit",
        ApiKey::OffsetFetch => "OffsetFetch",
        _ => "other",
    }
}

/// A whole response frame: its length, the header, then the message.
fn encode<M: Encodable>(h: &Header, key: ApiKey, v: i16, msg: &M) -> Result<Bytes, String> {
    let mut out = BytesMut::new();
    out.extend_from_slice(&[0; 4]);
    let mut header = ResponseHeader::default();
    header.correlation_id = h.correlation_id;
    header
        .encode(&mut out, key.response_header_version(v))
        .map_err(|e| e.to_string())?;
    msg.encode(&mut out, v).map_err(|e| e.to_string())?;
    let len = i32::try_from(out.len() - 4).map_err(|_| "a response over 2 GiB".to_owned())?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out.freeze())
}
