//! Which nodes hold a (category, owner) pair's chunks (`--replicas k`).
//!
//! The owner and the k-1 other members with the highest rendezvous score
//! of (category, owner, node): every node computes the same set from the
//! same membership, and a node joining or leaving moves only the pairs it
//! enters or leaves. Members are this node and its peers that are not
//! treated as lost (forgotten, or unreachable past `--owner-lost-after`):
//! a holder that is lost is replaced by the next node in the order, and
//! comes back into its place when it answers again. A lost owner's chunks
//! are held by the k best-scored other members.
//!
//! Two nodes whose views differ for a while (a join seen by one of them
//! first) each copy what *they* think they hold: a chunk then has more
//! copies than k, never fewer.
//!
//! The score is FNV-1a over the three names, finished with a 64-bit mixer:
//! fixed here so that every build of every node agrees.

/// The score of `node` for `owner`'s chunks of `category`.
pub fn score(category: &str, owner: &str, node: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for part in [category, owner, node] {
        for &b in part.as_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(PRIME);
        }
        // A separator no name contains.
        h = (h ^ 0xff).wrapping_mul(PRIME);
    }
    // splitmix64's finaliser: FNV's low bits mix poorly on their own.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The holders of `owner`'s chunks of `category` among `members` (which
/// include the owner when it is not lost): the owner first when it is a
/// member, then the others by descending score, `k` in all (fewer when
/// there are fewer members).
pub fn holders(category: &str, owner: &str, members: &[&str], k: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(k);
    if members.contains(&owner) {
        out.push(owner.to_owned());
    }
    let mut others: Vec<(u64, &str)> = members
        .iter()
        .filter(|&&m| m != owner)
        .map(|&m| (score(category, owner, m), m))
        .collect();
    // Ties (never seen in practice) are broken by name, so that every
    // node orders them alike.
    others.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    let room = k.saturating_sub(out.len());
    out.extend(others.into_iter().take(room).map(|(_, m)| m.to_owned()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i}")).collect()
    }

    #[test]
    fn the_owner_holds_its_chunks_and_k_nodes_hold_each_pair() {
        let all = names(5);
        let members: Vec<&str> = all.iter().map(String::as_str).collect();
        for owner in &members {
            let h = holders("app", owner, &members, 2);
            assert_eq!(h.len(), 2);
            assert_eq!(h[0], *owner);
            assert_ne!(h[1], *owner);
        }
        // k above the members: every member.
        assert_eq!(holders("app", "n0", &members, 9).len(), 5);
        // A lost owner (not a member): k other nodes.
        let without: Vec<&str> = members.iter().copied().filter(|m| *m != "n0").collect();
        let h = holders("app", "n0", &without, 2);
        assert_eq!(h.len(), 2);
        assert!(!h.contains(&"n0".to_owned()));
    }

    #[test]
    fn scores_are_fixed_across_builds() {
        // Every node must compute the same holders: the score is part of
        // the protocol.
        assert_ne!(score("app", "eu1", "eu2"), score("app", "eu2", "eu1"));
        assert_ne!(score("ap", "peu1", "eu2"), score("app", "eu1", "eu2"));
        // Computed apart from this code, from the definition above.
        assert_eq!(score("app", "eu1", "eu2"), 0x7759_f56a_7cfe_f87b);
        assert_eq!(score("", "", ""), 0x3899_e489_d898_6d44);
    }

    #[test]
    fn a_join_moves_only_the_pairs_the_new_node_enters() {
        let mut all = names(10);
        let before: Vec<&str> = all.iter().map(String::as_str).collect();
        let cats: Vec<String> = (0..200).map(|i| format!("c{i}")).collect();
        let old: Vec<Vec<String>> = cats.iter().map(|c| holders(c, "n0", &before, 3)).collect();
        all.push("n10".to_owned());
        let after: Vec<&str> = all.iter().map(String::as_str).collect();
        let mut moved = 0;
        for (c, old) in cats.iter().zip(&old) {
            let new = holders(c, "n0", &after, 3);
            if &new != old {
                moved += 1;
                // The only change: the new node took one place.
                assert!(new.contains(&"n10".to_owned()), "{old:?} -> {new:?}");
                let kept = new.iter().filter(|n| old.contains(n)).count();
                assert_eq!(kept, 2, "{old:?} -> {new:?}");
            }
        }
        // About 2 of 10 other nodes' places per pair go to the newcomer.
        assert!((10..=80).contains(&moved), "{moved} of 200 pairs moved");
    }

    #[test]
    fn pairs_spread_over_the_nodes() {
        let all = names(5);
        let members: Vec<&str> = all.iter().map(String::as_str).collect();
        let mut count = std::collections::BTreeMap::new();
        for i in 0..1000 {
            let c = format!("cat{i}");
            for h in holders(&c, "n0", &members, 2).into_iter().skip(1) {
                *count.entry(h).or_insert(0) += 1;
            }
        }
        // 1000 second copies over 4 nodes: each near 250.
        assert_eq!(count.len(), 4);
        assert!(
            count.values().all(|&n| (180..=320).contains(&n)),
            "{count:?}"
        );
    }
}
