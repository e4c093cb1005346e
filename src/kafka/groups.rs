//! Consumer groups (Kafka's classic group protocol) on their coordinator.
//!
//! A group's coordinator is one node chosen from the group id among the
//! nodes it sees up (see `Broker::coordinator`); it alone keeps the group's
//! membership, in memory. What a group has consumed is not kept here: its
//! commits are chunkbus consumer positions (replicated, durable), so a new
//! coordinator, after the old one died, starts with an empty group, the
//! members join it again, and read their offsets back from the positions.
//!
//! The protocol, as Kafka runs it: members join (JoinGroup waits until
//! every known member has joined again, or the rebalance timeout passed and
//! the laggards are dropped); the generation goes up; the leader, given
//! every member's subscription, sends the assignment (SyncGroup) and each
//! member gets its share; heartbeats keep a member in, and tell it when a
//! rebalance starts; a member silent for its session timeout is dropped,
//! which starts one.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

/// Error codes of the group protocol.
pub mod code {
    pub const NONE: i16 = 0;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const ILLEGAL_GENERATION: i16 = 22;
    pub const INCONSISTENT_GROUP_PROTOCOL: i16 = 23;
    pub const INVALID_GROUP_ID: i16 = 24;
    pub const UNKNOWN_MEMBER_ID: i16 = 25;
    pub const INVALID_SESSION_TIMEOUT: i16 = 26;
    pub const REBALANCE_IN_PROGRESS: i16 = 27;
    pub const GROUP_MAX_SIZE_REACHED: i16 = 81;
}

/// Members a group may have.
pub const MAX_MEMBERS: usize = 1000;
/// Groups a node coordinates at once (groups with no members are dropped).
pub const MAX_GROUPS: usize = 10_000;
/// Members of all the groups a node coordinates.
pub const MAX_ALL_MEMBERS: usize = 10_000;
/// Bytes of protocol metadata a member may send (a consumer's is its
/// subscription: topic names, a few hundred bytes).
pub const MAX_MEMBER_METADATA: usize = 16 << 10;
/// Session timeouts accepted (Kafka's defaults for
/// `group.min/max.session.timeout.ms`).
const SESSION_TIMEOUT_MS: std::ops::RangeInclusive<i32> = 6_000..=1_800_000;
/// Longest a rebalance waits for members to join again.
const MAX_REBALANCE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No members.
    Empty,
    /// Waiting for the members to join again.
    Preparing,
    /// Joined; waiting for the leader's assignment.
    Completing,
    Stable,
}

#[derive(Debug)]
struct Member {
    client_id: String,
    protocols: Vec<(String, Bytes)>,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    last_seen: Instant,
    /// Joined in the rebalance under way.
    joined: bool,
    /// What its JoinGroup is answered with, once the rebalance completes.
    join_answer: Option<JoinAnswer>,
    assignment: Option<Bytes>,
}

#[derive(Debug)]
struct Group {
    state: State,
    generation: i32,
    protocol_type: String,
    protocol: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// When the rebalance under way drops the members not joined yet.
    rebalance_deadline: Option<Instant>,
}

impl Group {
    fn new(protocol_type: &str) -> Self {
        Self {
            state: State::Empty,
            generation: 0,
            protocol_type: protocol_type.to_owned(),
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            rebalance_deadline: None,
        }
    }

    /// Starts a rebalance: every member must join again.
    fn prepare(&mut self, now: Instant) {
        if self.state != State::Preparing {
            for m in self.members.values_mut() {
                m.joined = false;
                m.join_answer = None;
            }
            let longest = self
                .members
                .values()
                .map(|m| m.rebalance_timeout)
                .max()
                .unwrap_or_default();
            self.rebalance_deadline = Some(now + longest);
            self.state = State::Preparing;
        }
    }

    fn empty(&mut self) {
        self.state = State::Empty;
        self.generation += 1;
        self.leader = None;
        self.protocol = None;
        self.rebalance_deadline = None;
    }

    /// Completes the rebalance if every member has joined.
    fn try_complete(&mut self) -> bool {
        if self.state != State::Preparing || self.members.values().any(|m| !m.joined) {
            return false;
        }
        if self.members.is_empty() {
            self.empty();
            return true;
        }
        self.generation += 1;
        self.rebalance_deadline = None;
        // The first protocol of the leader's list that every member has.
        if self
            .leader
            .as_ref()
            .is_none_or(|l| !self.members.contains_key(l))
        {
            self.leader = self.members.keys().next().cloned();
        }
        let leader = self.leader.clone().unwrap_or_default();
        let protocol = self.members[&leader]
            .protocols
            .iter()
            .map(|(n, _)| n)
            .find(|n| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(p, _)| p == *n))
            })
            .cloned()
            .unwrap_or_default();
        let roster: Vec<(String, Bytes)> = self
            .members
            .iter()
            .map(|(id, m)| {
                let meta = m
                    .protocols
                    .iter()
                    .find(|(p, _)| *p == protocol)
                    .map(|(_, b)| b.clone())
                    .unwrap_or_default();
                (id.clone(), meta)
            })
            .collect();
        for (id, m) in self.members.iter_mut() {
            m.assignment = None;
            m.join_answer = Some(JoinAnswer {
                error: code::NONE,
                generation: self.generation,
                protocol: protocol.clone(),
                leader: leader.clone(),
                member_id: id.clone(),
                members: if *id == leader {
                    roster.clone()
                } else {
                    Vec::new()
                },
            });
        }
        self.protocol = Some(protocol);
        self.state = State::Completing;
        true
    }

    /// Drops members whose session ran out and, past the rebalance
    /// deadline, those that did not join again. Returns true on a change.
    fn expire(&mut self, now: Instant) -> bool {
        let before = self.members.len();
        let preparing = self.state == State::Preparing;
        let deadline_passed = self.rebalance_deadline.is_some_and(|d| now >= d);
        self.members.retain(|_, m| {
            if preparing {
                // A member waiting in JoinGroup is held by the rebalance
                // timeout, not its session.
                m.joined || (!deadline_passed && now < m.last_seen + m.session_timeout)
            } else {
                now < m.last_seen + m.session_timeout
            }
        });
        let dropped = self.members.len() != before;
        if dropped && !preparing && self.state != State::Empty {
            self.prepare(now);
        }
        let completed = self.try_complete();
        dropped || completed
    }
}

/// What a JoinGroup is answered with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JoinAnswer {
    pub error: i16,
    pub generation: i32,
    pub protocol: String,
    pub leader: String,
    pub member_id: String,
    /// Every member's metadata, for the leader only.
    pub members: Vec<(String, Bytes)>,
}

impl JoinAnswer {
    fn error(error: i16, member_id: &str) -> Self {
        Self {
            error,
            generation: -1,
            member_id: member_id.to_owned(),
            ..Default::default()
        }
    }
}

/// The groups this node coordinates.
#[derive(Debug)]
pub struct Groups {
    groups: Mutex<HashMap<String, Group>>,
    /// Bumped on every change of any group; waiters check theirs again.
    changed: watch::Sender<u64>,
}

impl Default for Groups {
    fn default() -> Self {
        Self {
            groups: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(0),
        }
    }
}

/// A JoinGroup request, as the coordinator needs it.
#[derive(Debug, Clone)]
pub struct Join<'a> {
    pub group_id: &'a str,
    pub member_id: &'a str,
    pub client_id: &'a str,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: &'a str,
    pub protocols: &'a [(String, Bytes)],
}

impl Groups {
    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Joins `j.member_id` (a new member when empty) to the group and waits
    /// until the rebalance completes (or `shutdown`).
    pub async fn join(
        &self,
        j: Join<'_>,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> JoinAnswer {
        if !SESSION_TIMEOUT_MS.contains(&j.session_timeout_ms) {
            return JoinAnswer::error(code::INVALID_SESSION_TIMEOUT, j.member_id);
        }
        let metadata: usize = j.protocols.iter().map(|(n, m)| n.len() + m.len()).sum();
        if metadata > MAX_MEMBER_METADATA {
            return JoinAnswer::error(code::GROUP_MAX_SIZE_REACHED, j.member_id);
        }
        let mut changes = self.changed.subscribe();
        let member_id = {
            let mut groups = self.groups.lock().unwrap();
            if !groups.contains_key(j.group_id) && groups.len() >= MAX_GROUPS {
                groups.retain(|_, g| !g.members.is_empty());
                if groups.len() >= MAX_GROUPS {
                    return JoinAnswer::error(code::COORDINATOR_NOT_AVAILABLE, j.member_id);
                }
            }
            let all: usize = groups.values().map(|g| g.members.len()).sum();
            let g = groups
                .entry(j.group_id.to_owned())
                .or_insert_with(|| Group::new(j.protocol_type));
            if g.members.is_empty() {
                g.protocol_type = j.protocol_type.to_owned();
            }
            if j.protocols.is_empty()
                || g.protocol_type != j.protocol_type
                || g.members.values().any(|m| {
                    !j.protocols
                        .iter()
                        .any(|(p, _)| m.protocols.iter().any(|(q, _)| q == p))
                })
            {
                return JoinAnswer::error(code::INCONSISTENT_GROUP_PROTOCOL, j.member_id);
            }
            let member_id = if j.member_id.is_empty() {
                if g.members.len() >= MAX_MEMBERS {
                    return JoinAnswer::error(code::GROUP_MAX_SIZE_REACHED, j.member_id);
                }
                if all >= MAX_ALL_MEMBERS {
                    return JoinAnswer::error(code::COORDINATOR_NOT_AVAILABLE, j.member_id);
                }
                // The client id names the member (as Kafka does), cut short:
                // it comes from the wire and is kept as long as the member.
                let client: String = j.client_id.chars().take(64).collect();
                format!("{client}-{:016x}", super::producers::new_producer_id())
            } else if g.members.contains_key(j.member_id) {
                j.member_id.to_owned()
            } else {
                return JoinAnswer::error(code::UNKNOWN_MEMBER_ID, j.member_id);
            };
            let now = Instant::now();
            g.prepare(now);
            let rebalance_timeout = Duration::from_millis(j.rebalance_timeout_ms.max(0) as u64)
                .min(MAX_REBALANCE_TIMEOUT);
            g.members.insert(
                member_id.clone(),
                Member {
                    client_id: j.client_id.chars().take(64).collect(),
                    protocols: j.protocols.to_vec(),
                    session_timeout: Duration::from_millis(j.session_timeout_ms as u64),
                    rebalance_timeout,
                    last_seen: now,
                    joined: true,
                    join_answer: None,
                    assignment: None,
                },
            );
            // A member joining late extends the rebalance to its timeout.
            let deadline = now + rebalance_timeout;
            if g.rebalance_deadline.is_none_or(|d| d < deadline) {
                g.rebalance_deadline = Some(deadline);
            }
            g.try_complete();
            member_id
        };
        self.bump();
        loop {
            {
                let mut groups = self.groups.lock().unwrap();
                let m = groups
                    .get_mut(j.group_id)
                    .and_then(|g| g.members.get_mut(&member_id));
                match m {
                    None => return JoinAnswer::error(code::UNKNOWN_MEMBER_ID, &member_id),
                    Some(m) => {
                        if let Some(a) = m.join_answer.take() {
                            m.last_seen = Instant::now();
                            return a;
                        }
                    }
                }
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { break },
                _ = shutdown.cancelled() => break,
            }
        }
        JoinAnswer::error(code::REBALANCE_IN_PROGRESS, &member_id)
    }

    /// A member's SyncGroup: stores the leader's assignment, and answers
    /// with this member's share once the leader has sent it.
    pub async fn sync(
        &self,
        group_id: &str,
        generation: i32,
        member_id: &str,
        assignments: Vec<(String, Bytes)>,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> (i16, Bytes) {
        let mut changes = self.changed.subscribe();
        let mut assignments = Some(assignments);
        loop {
            {
                let mut groups = self.groups.lock().unwrap();
                let Some(g) = groups.get_mut(group_id) else {
                    return (code::UNKNOWN_MEMBER_ID, Bytes::new());
                };
                if !g.members.contains_key(member_id) {
                    return (code::UNKNOWN_MEMBER_ID, Bytes::new());
                }
                if g.generation != generation {
                    return (code::ILLEGAL_GENERATION, Bytes::new());
                }
                g.members.get_mut(member_id).unwrap().last_seen = Instant::now();
                match g.state {
                    State::Empty | State::Preparing => {
                        return (code::REBALANCE_IN_PROGRESS, Bytes::new());
                    }
                    State::Completing => {
                        if g.leader.as_deref() == Some(member_id)
                            && let Some(given) = assignments.take()
                        {
                            let mut given: HashMap<String, Bytes> = given.into_iter().collect();
                            for (id, m) in g.members.iter_mut() {
                                m.assignment = Some(given.remove(id).unwrap_or_default());
                            }
                            g.state = State::Stable;
                            drop(groups);
                            self.bump();
                            continue;
                        }
                    }
                    State::Stable => {
                        let a = g.members[member_id].assignment.clone().unwrap_or_default();
                        return (code::NONE, a);
                    }
                }
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { break },
                _ = shutdown.cancelled() => break,
            }
        }
        (code::REBALANCE_IN_PROGRESS, Bytes::new())
    }

    /// A member's heartbeat.
    pub fn heartbeat(&self, group_id: &str, generation: i32, member_id: &str) -> i16 {
        let mut groups = self.groups.lock().unwrap();
        let Some(g) = groups.get_mut(group_id) else {
            return code::UNKNOWN_MEMBER_ID;
        };
        let state = g.state;
        let current = g.generation;
        let Some(m) = g.members.get_mut(member_id) else {
            return code::UNKNOWN_MEMBER_ID;
        };
        m.last_seen = Instant::now();
        if state == State::Preparing {
            return code::REBALANCE_IN_PROGRESS;
        }
        if current != generation {
            return code::ILLEGAL_GENERATION;
        }
        code::NONE
    }

    /// Members leaving; returns each one's error code.
    pub fn leave(&self, group_id: &str, members: &[String]) -> Vec<i16> {
        let codes = {
            let mut groups = self.groups.lock().unwrap();
            let Some(g) = groups.get_mut(group_id) else {
                return vec![code::UNKNOWN_MEMBER_ID; members.len()];
            };
            let codes: Vec<i16> = members
                .iter()
                .map(|id| match g.members.remove(id) {
                    Some(_) => code::NONE,
                    None => code::UNKNOWN_MEMBER_ID,
                })
                .collect();
            if codes.contains(&code::NONE) {
                g.prepare(Instant::now());
                g.try_complete();
            }
            codes
        };
        self.bump();
        codes
    }

    /// Checks that a commit comes from a member of the current generation
    /// (`generation` -1: a consumer outside any group, always allowed).
    pub fn check_commit(&self, group_id: &str, generation: i32, member_id: &str) -> i16 {
        if generation < 0 {
            return code::NONE;
        }
        let groups = self.groups.lock().unwrap();
        let Some(g) = groups.get(group_id) else {
            return code::UNKNOWN_MEMBER_ID;
        };
        if !g.members.contains_key(member_id) {
            return code::UNKNOWN_MEMBER_ID;
        }
        if g.generation != generation {
            return code::ILLEGAL_GENERATION;
        }
        // Members commit what they read when told of a rebalance (before
        // they join again), so commits are taken while it is prepared; not
        // once it completed and the partitions may have moved on.
        if g.state == State::Completing {
            return code::REBALANCE_IN_PROGRESS;
        }
        code::NONE
    }

    /// The members of `group_id`: (member id, client id), for listings.
    pub fn members(&self, group_id: &str) -> Vec<(String, String)> {
        let groups = self.groups.lock().unwrap();
        groups.get(group_id).map_or_else(Vec::new, |g| {
            g.members
                .iter()
                .map(|(id, m)| (id.clone(), m.client_id.clone()))
                .collect()
        })
    }

    /// Drops members whose session or rebalance time ran out; called
    /// periodically by the listener.
    pub fn expire(&self) {
        self.expire_at(Instant::now());
    }

    fn expire_at(&self, now: Instant) {
        let changed = {
            let mut groups = self.groups.lock().unwrap();
            let mut changed = false;
            for g in groups.values_mut() {
                changed |= g.expire(now);
            }
            groups.retain(|_, g| g.state != State::Empty || !g.members.is_empty());
            changed
        };
        if changed {
            self.bump();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio_util::sync::CancellationToken;

    use super::*;

    fn join<'a>(group: &'a str, member: &'a str, protocols: &'a [(String, Bytes)]) -> Join<'a> {
        Join {
            group_id: group,
            member_id: member,
            client_id: "c",
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 20_000,
            protocol_type: "consumer",
            protocols,
        }
    }

    fn range() -> Vec<(String, Bytes)> {
        vec![("range".into(), Bytes::from_static(b"meta"))]
    }

    /// Waits (yielding to the other tasks) until `f` holds.
    async fn until(mut f: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if f() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never happened");
    }

    #[tokio::test]
    async fn a_second_member_rebalances_the_group_and_the_leader_assigns() {
        let g = Arc::new(Groups::default());
        let never = CancellationToken::new();
        let p = range();
        let a = g.join(join("g", "", &p), &never).await;
        assert_eq!((a.error, a.generation), (0, 1));
        assert_eq!((a.leader == a.member_id, a.members.len()), (true, 1));
        let one = vec![(a.member_id.clone(), Bytes::from_static(b"all"))];
        assert_eq!(g.sync("g", 1, &a.member_id, one, &never).await.0, 0);
        assert_eq!(g.heartbeat("g", 1, &a.member_id), 0);
        // A second member joins and waits for the first, which learns of
        // the rebalance from its heartbeat and joins again.
        let second = tokio::spawn({
            let (g, p) = (g.clone(), p.clone());
            async move { g.join(join("g", "", &p), &CancellationToken::new()).await }
        });
        until(|| g.heartbeat("g", 1, &a.member_id) == code::REBALANCE_IN_PROGRESS).await;
        // Commits of the generation ending are still taken meanwhile.
        assert_eq!(g.check_commit("g", 1, &a.member_id), 0);
        let a2 = g.join(join("g", &a.member_id, &p), &never).await;
        let b = second.await.unwrap();
        assert_eq!(
            (a2.error, a2.generation, b.error, b.generation),
            (0, 2, 0, 2)
        );
        // The leader stays the leader; only it is told the members.
        assert_eq!((&a2.leader, &b.leader), (&a.member_id, &a.member_id));
        assert_eq!((a2.members.len(), b.members.len()), (2, 0));
        assert_eq!(
            g.sync("g", 1, &b.member_id, vec![], &never).await.0,
            code::ILLEGAL_GENERATION
        );
        assert_eq!(
            g.check_commit("g", 2, &b.member_id),
            code::REBALANCE_IN_PROGRESS
        );
        // The follower waits for the leader's assignment.
        let follower = tokio::spawn({
            let (g, id) = (g.clone(), b.member_id.clone());
            async move { g.sync("g", 2, &id, vec![], &CancellationToken::new()).await }
        });
        let assign = vec![
            (a.member_id.clone(), Bytes::from_static(b"0,1")),
            (b.member_id.clone(), Bytes::from_static(b"2")),
        ];
        let (e, mine) = g.sync("g", 2, &a.member_id, assign, &never).await;
        assert_eq!((e, &mine[..]), (0, &b"0,1"[..]));
        let (e, theirs) = follower.await.unwrap();
        assert_eq!((e, &theirs[..]), (0, &b"2"[..]));
        assert_eq!(g.check_commit("g", 2, &b.member_id), 0);
        assert_eq!(
            g.check_commit("g", 1, &b.member_id),
            code::ILLEGAL_GENERATION
        );
        assert_eq!(g.check_commit("g", 2, "stranger"), code::UNKNOWN_MEMBER_ID);
        assert_eq!(g.check_commit("g", -1, ""), 0);
        assert_eq!(g.members("g").len(), 2);
    }

    #[tokio::test]
    async fn a_silent_member_is_dropped_and_the_rest_rebalance_without_it() {
        let g = Arc::new(Groups::default());
        let never = CancellationToken::new();
        let p = range();
        let a = g.join(join("g", "", &p), &never).await;
        let second = tokio::spawn({
            let (g, p) = (g.clone(), p.clone());
            async move { g.join(join("g", "", &p), &CancellationToken::new()).await }
        });
        until(|| g.heartbeat("g", 1, &a.member_id) == code::REBALANCE_IN_PROGRESS).await;
        // `a` never joins again: its session (10 s) runs out first.
        g.expire_at(Instant::now() + Duration::from_secs(5));
        assert_eq!(g.members("g").len(), 2);
        g.expire_at(Instant::now() + Duration::from_secs(11));
        let b = second.await.unwrap();
        assert_eq!((b.error, b.generation, b.members.len()), (0, 2, 1));
        assert_eq!(b.leader, b.member_id);
        assert_eq!(g.heartbeat("g", 2, &a.member_id), code::UNKNOWN_MEMBER_ID);
        // A stable member silent past its session is dropped too, and the
        // group, empty now, is forgotten.
        let one = vec![(b.member_id.clone(), Bytes::new())];
        assert_eq!(g.sync("g", 2, &b.member_id, one, &never).await.0, 0);
        g.expire_at(Instant::now() + Duration::from_secs(11));
        assert!(g.members("g").is_empty());
        assert_eq!(g.heartbeat("g", 2, &b.member_id), code::UNKNOWN_MEMBER_ID);
    }

    #[tokio::test]
    async fn a_member_that_leaves_starts_a_rebalance_and_bad_joins_are_refused() {
        let g = Arc::new(Groups::default());
        let never = CancellationToken::new();
        let p = range();
        let a = g.join(join("g", "", &p), &never).await;
        assert_eq!(
            g.leave("g", &[a.member_id.clone(), "x".into()]),
            [0, code::UNKNOWN_MEMBER_ID]
        );
        assert!(g.members("g").is_empty());
        let other = vec![("roundrobin".to_owned(), Bytes::new())];
        let b = g.join(join("g", "", &p), &never).await;
        assert_eq!(
            b.generation, 3,
            "a generation for the empty group in between"
        );
        let mut j = join("g", "", &other);
        assert_eq!(
            g.join(j.clone(), &never).await.error,
            code::INCONSISTENT_GROUP_PROTOCOL
        );
        j.protocols = &p;
        j.member_id = "made-up";
        assert_eq!(
            g.join(j.clone(), &never).await.error,
            code::UNKNOWN_MEMBER_ID
        );
        j.member_id = "";
        let big = vec![(
            "range".to_owned(),
            Bytes::from(vec![0u8; MAX_MEMBER_METADATA]),
        )];
        j.protocols = &big;
        assert_eq!(
            g.join(j.clone(), &never).await.error,
            code::GROUP_MAX_SIZE_REACHED
        );
        j.protocols = &p;
        j.session_timeout_ms = 10;
        assert_eq!(g.join(j, &never).await.error, code::INVALID_SESSION_TIMEOUT);
    }
}
