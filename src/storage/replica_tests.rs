//! Tests of copies of other owners' chunks: completion records survive
//! restarts exactly, short copies are repaired, longer ones are kept.

use std::time::Duration;

use bytes::Bytes;

use super::*;

fn opts(dir: &Path) -> StorageOptions {
    StorageOptions {
        data_dir: dir.to_owned(),
        node: "n1".into(),
        max_chunk_bytes: 1 << 20,
        rotate_after: Duration::from_secs(3600),
        sync: SyncPolicy::Always,
        disk_high_water_percent: 100,
        tiered: false,
        zero_runway: false,
        drop_behind: None,
        max_categories: 10_000,
        idle_close_after: IDLE_CLOSE_AFTER,
    }
}

async fn open(dir: &Path) -> Storage {
    Storage::open(opts(dir), Metrics::new()).await.unwrap()
}

async fn open_tiered(dir: &Path) -> Storage {
    let opts = StorageOptions {
        tiered: true,
        ..opts(dir)
    };
    Storage::open(opts, Metrics::new()).await.unwrap()
}

/// Stops `s` cleanly and opens its directory again.
async fn restart(s: Storage, dir: &Path) -> Storage {
    s.shutdown().await;
    drop(s);
    open(dir).await
}

/// Stops `s` cleanly and opens its directory again, with S3 tiering on.
async fn restart_tiered(s: Storage, dir: &Path) -> Storage {
    s.shutdown().await;
    drop(s);
    open_tiered(dir).await
}

/// A copy of `chunk` holding `data`, completed at its size.
async fn complete_copy(s: &Storage, chunk: &ChunkName, data: &'static [u8]) {
    s.replica_append("app", chunk, 0, Bytes::from_static(data))
        .await
        .unwrap();
    s.replica_complete("app", chunk, data.len() as u64)
        .await
        .unwrap();
}

fn state_of(s: &Storage, cat: &str) -> Vec<(u32, u64, bool)> {
    s.chunks(cat)
        .unwrap()
        .into_iter()
        .map(|c| (c.name.index, c.meta.size, c.meta.complete))
        .collect()
}

/// The schedule of the lost lines: chunk 3 of eu2 was copied short (the
/// copy missed its owner's restart), then chunk 4 completed. A restart must
/// not take chunk 3 for complete.
#[tokio::test]
async fn a_later_completion_never_vouches_for_a_short_earlier_copy() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path()).await;
    let (c3, c4) = (ChunkName::new("eu2", 3), ChunkName::new("eu2", 4));
    s.replica_append("app", &c3, 0, Bytes::from_static(b"a\nb\n"))
        .await
        .unwrap();
    s.replica_append("app", &c4, 0, Bytes::from_static(b"c\n"))
        .await
        .unwrap();
    s.replica_complete("app", &c4, 2).await.unwrap();
    let s = restart(s, dir.path()).await;
    assert_eq!(state_of(&s, "app"), [(3, 4, false), (4, 2, true)]);
    s.shutdown().await;
}

#[tokio::test]
async fn a_short_complete_copy_is_reopened_and_completed_at_the_owners_size() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path()).await;
    let c = ChunkName::new("eu2", 0);
    // Completed short (as a version-1 watermark or a forget could have).
    complete_copy(&s, &c, b"a\n").await;
    let s = restart(s, dir.path()).await;
    assert_eq!(state_of(&s, "app"), [(0, 2, true)]);
    assert_eq!(s.replica_reopen("app", &c).await.unwrap(), 2);
    assert_eq!(state_of(&s, "app"), [(0, 2, false)]);
    // The reopening is durable before anything is appended.
    let s = restart(s, dir.path()).await;
    assert_eq!(state_of(&s, "app"), [(0, 2, false)]);
    s.replica_append("app", &c, 2, Bytes::from_static(b"b\n"))
        .await
        .unwrap();
    s.replica_complete("app", &c, 4).await.unwrap();
    let s = restart(s, dir.path()).await;
    assert_eq!(state_of(&s, "app"), [(0, 4, true)]);
    let data = std::fs::read(dir.path().join("app").join(c.to_string())).unwrap();
    assert_eq!(data, b"a\nb\n");
    s.shutdown().await;
}

/// A copy that was uploaded short (a forget completed it; its owner came
/// back with more) is reopened to copy the rest: the upload no longer
/// describes it. It must not stay evictable, nor be taken at a restart for
/// a partial copy of the short object (and dropped), and once completed at
/// the owner's size it is recorded uploaded at that size only when it is.
#[tokio::test]
async fn a_reopened_copy_is_no_longer_recorded_as_uploaded() {
    let dir = tempfile::tempdir().unwrap();
    let s = open_tiered(dir.path()).await;
    let c = ChunkName::new("eu2", 0);
    complete_copy(&s, &c, b"a\n").await;
    assert_eq!(s.mark_uploaded("app", &c).await.unwrap(), TierOutcome::Done);
    assert_eq!(s.evictable().len(), 1);
    assert_eq!(s.disk().reclaimable(), 2);
    assert_eq!(s.replica_reopen("app", &c).await.unwrap(), 2);
    let m = s.chunk_meta("app", &c).unwrap();
    assert!(!m.complete && !m.uploaded && m.local, "{m:?}");
    assert!(s.evictable().is_empty());
    assert_eq!(s.disk().reclaimable(), 0);
    // A restart in the middle of the repair keeps the copy, open.
    s.replica_append("app", &c, 2, Bytes::from_static(b"b\n"))
        .await
        .unwrap();
    let s = restart_tiered(s, dir.path()).await;
    let m = s.chunk_meta("app", &c).unwrap();
    assert!(
        !m.complete && !m.uploaded && m.local && m.size == 4,
        "{m:?}"
    );
    s.replica_append("app", &c, 4, Bytes::from_static(b"c\n"))
        .await
        .unwrap();
    s.replica_complete("app", &c, 6).await.unwrap();
    let m = s.chunk_meta("app", &c).unwrap();
    assert!(m.complete && !m.uploaded && m.local, "{m:?}");
    assert!(s.evictable().is_empty());
    // Recorded again once the owner's upload of the whole chunk is known.
    assert_eq!(s.mark_uploaded("app", &c).await.unwrap(), TierOutcome::Done);
    let s = restart_tiered(s, dir.path()).await;
    let m = s.chunk_meta("app", &c).unwrap();
    assert!(m.complete && m.uploaded && m.local && m.size == 6, "{m:?}");
    assert_eq!(s.disk().reclaimable(), 6);
    let data = std::fs::read(dir.path().join("app").join(c.to_string())).unwrap();
    assert_eq!(data, b"a\nb\nc\n");
    s.shutdown().await;
}

/// A copy completed, then gone before its completion was recorded in the
/// background (its object took its place, it was evicted or released):
/// nothing to record, and nothing failed.
#[tokio::test]
async fn a_completion_of_a_copy_gone_since_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path()).await;
    let (kept, gone) = (ChunkName::new("eu2", 0), ChunkName::new("eu2", 1));
    complete_copy(&s, &kept, b"a\n").await;
    complete_copy(&s, &gone, b"b\n").await;
    let cat = s.category("app").unwrap();
    let job = |chunk: &ChunkName| replica::Completion {
        cat: cat.clone(),
        chunk: chunk.clone(),
        path: cat.chunk_path(chunk),
        size: 2,
    };
    assert!(replica::record_completion(&job(&kept)).unwrap());
    std::fs::remove_file(cat.chunk_path(&gone)).unwrap();
    assert!(!replica::record_completion(&job(&gone)).unwrap());
    s.shutdown().await;
}

#[tokio::test]
async fn a_copy_longer_than_its_owner_is_never_cut_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path()).await;
    let c = ChunkName::new("eu2", 0);
    s.replica_append("app", &c, 0, Bytes::from_static(b"a\nb\n"))
        .await
        .unwrap();
    let e = s.replica_complete("app", &c, 2).await.unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::CopyDisagrees {
                held: 4,
                owner_size: 2,
                ..
            }
        ),
        "{e}"
    );
    let data = std::fs::read(dir.path().join("app").join(c.to_string())).unwrap();
    assert_eq!(data, b"a\nb\n");
    assert_eq!(state_of(&s, "app"), [(0, 4, false)]);
    s.shutdown().await;
}

/// A recorded index whose copy is written again (it was deleted, or its
/// owner was forgotten before it was copied) loses its record first, so a
/// crash halfway through the new copy does not find it complete.
#[tokio::test]
async fn copying_a_recorded_index_again_removes_its_record_first() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path()).await;
    let c = ChunkName::new("eu2", 7);
    complete_copy(&s, &c, b"a\n").await;
    let s = restart(s, dir.path()).await;
    assert!(s.delete_chunk("app", &c).await.unwrap());
    s.replica_append("app", &c, 0, Bytes::from_static(b"a\n"))
        .await
        .unwrap();
    // Killed here: the state must not vouch for the new, partial copy.
    let st = state::load(&dir.path().join("app")).unwrap();
    assert!(!st.is_complete("eu2", 7), "{st:?}");
    s.shutdown().await;
}

/// An object longer than a complete copy, whose numbers run into the
/// owner's next chunk held here (the owner's previous process uploaded it
/// before the owner lost its disk, and S3 applied that late): the copy is
/// kept, and so is the next chunk's numbering; the owner replaces the
/// object. Without numbers, or when they end where the next chunk starts,
/// the object is taken.
#[tokio::test]
async fn a_copy_gives_way_to_no_object_whose_numbers_run_into_the_next_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let s = open_tiered(dir.path()).await;
    let chunks = [0, 1, 2, 3].map(|i| ChunkName::new("eu2", i));
    for (i, c) in chunks.iter().enumerate() {
        s.replica_append("app", c, 0, Bytes::from_static(b"a\n"))
            .await
            .unwrap();
        s.replica_complete("app", c, 2).await.unwrap();
        // Chunk 1 starts where the longer object of chunk 0 would end.
        let first = [0, 2, 3, 4][i];
        s.learn_numbers(
            "app",
            c,
            numbering::LineRecord {
                size: 2,
                first,
                lines: 1,
            },
        )
        .await
        .unwrap();
    }
    let longer = |first| numbering::LineRecord {
        size: 4,
        first,
        lines: 2,
    };
    // Chunk 2's object would end at 5; chunk 3 starts at 4.
    assert_eq!(
        s.add_remote("app", &chunks[2], 4, 0, Some(longer(3)))
            .await
            .unwrap(),
        TierOutcome::NotEligible
    );
    let m = s.chunk_meta("app", &chunks[2]).unwrap();
    assert!(m.complete && m.local && !m.uploaded && m.size == 2, "{m:?}");
    assert_eq!(m.line_record().map(|r| r.end()), Some(4));
    for (c, numbers) in [(&chunks[0], Some(longer(0))), (&chunks[1], None)] {
        assert_eq!(
            s.add_remote("app", c, 4, 0, numbers).await.unwrap(),
            TierOutcome::Done
        );
        let m = s.chunk_meta("app", c).unwrap();
        assert!(m.uploaded && !m.local && m.size == 4, "{m:?}");
    }
    s.shutdown().await;
}

/// Another owner's object taken here without its bytes before the owner's
/// next chunk was known (so the guard above could not see that its numbers
/// run into it), then replaced by the owner with a shorter one: the record
/// follows the shorter object and its numbers, and keeps them across a
/// restart. A complete copy held here is never cut back (above), nor is a
/// chunk listed as held elsewhere (its owner's word, not an object's).
#[tokio::test]
async fn a_record_without_bytes_follows_an_object_its_owner_made_shorter() {
    let dir = tempfile::tempdir().unwrap();
    let s = open_tiered(dir.path()).await;
    let chunk = ChunkName::new("eu2", 0);
    let listed = ChunkName::new("eu2", 1);
    s.note_elsewhere("app", &listed, 4, true, None, None)
        .unwrap();
    assert_eq!(
        s.add_remote("app", &listed, 2, 0, None).await.unwrap(),
        TierOutcome::NotEligible
    );
    let m = s.chunk_meta("app", &listed).unwrap();
    assert!(m.elsewhere() && m.size == 4, "{m:?}");
    let late = numbering::LineRecord {
        size: 4,
        first: 0,
        lines: 2,
    };
    let replaced = numbering::LineRecord {
        size: 2,
        first: 0,
        lines: 1,
    };
    assert_eq!(
        s.add_remote("app", &chunk, 4, 0, Some(late)).await.unwrap(),
        TierOutcome::Done
    );
    assert_eq!(
        s.add_remote("app", &chunk, 2, 0, Some(replaced))
            .await
            .unwrap(),
        TierOutcome::Done
    );
    let check = |s: &Storage| {
        let m = s.chunk_meta("app", &chunk).unwrap();
        assert!(m.complete && m.uploaded && !m.local && m.size == 2, "{m:?}");
        assert_eq!(m.line_record(), Some(replaced));
    };
    check(&s);
    s.shutdown().await;
    drop(s);
    let s = open_tiered(dir.path()).await;
    check(&s);
    s.shutdown().await;
}

/// A chunk listed here as held by other nodes, complete at 4 bytes, whose
/// owner then lists it as uploaded at 2 (it lost its disk and restored it
/// as its peers or S3 held it: the chaos soak's `--replicas 2`, where this
/// node did not hold the chunk): the listing follows its owner's word, and
/// is recorded as in S3 at 2 bytes with its numbers, also across a
/// restart. An object alone does not shrink it (above); nor does the
/// owner's word shrink a copy held here.
#[tokio::test]
async fn a_listing_held_elsewhere_follows_its_owners_shorter_upload() {
    let dir = tempfile::tempdir().unwrap();
    let s = open_tiered(dir.path()).await;
    let [listed, copied] = [0, 1].map(|i| ChunkName::new("eu2", i));
    s.note_elsewhere("app", &listed, 4, true, Some(0), None)
        .unwrap();
    s.replica_append("app", &copied, 0, Bytes::from_static(b"a\nb\n"))
        .await
        .unwrap();
    s.replica_complete("app", &copied, 4).await.unwrap();
    let numbers = numbering::LineRecord {
        size: 2,
        first: 0,
        lines: 1,
    };
    assert_eq!(
        s.add_owners_upload("app", &listed, 2, Some(numbers))
            .await
            .unwrap(),
        TierOutcome::Done
    );
    assert_eq!(
        s.add_owners_upload("app", &copied, 2, Some(numbers))
            .await
            .unwrap(),
        TierOutcome::NotEligible
    );
    let check = |s: &Storage| {
        let m = s.chunk_meta("app", &listed).unwrap();
        assert!(m.complete && m.uploaded && !m.local && m.size == 2, "{m:?}");
        assert_eq!(m.line_record(), Some(numbers));
        let m = s.chunk_meta("app", &copied).unwrap();
        assert!(m.complete && !m.uploaded && m.local && m.size == 4, "{m:?}");
    };
    check(&s);
    s.shutdown().await;
    drop(s);
    let s = open_tiered(dir.path()).await;
    check(&s);
    s.shutdown().await;
}

#[tokio::test]
async fn forgetting_an_owner_records_only_its_open_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path()).await;
    let (c1, c5) = (ChunkName::new("eu2", 1), ChunkName::new("eu2", 5));
    for c in [&c1, &c5] {
        s.replica_append("app", c, 0, Bytes::from_static(b"x\n"))
            .await
            .unwrap();
    }
    assert_eq!(s.forget_owner("eu2").await.unwrap(), 2);
    let st = state::load(&dir.path().join("app")).unwrap();
    assert_eq!(st.complete["eu2"].ranges(), &[(1, 1), (5, 5)]);
    s.shutdown().await;
}

/// The owner uploaded a chunk whose complete copy here is short: the copy
/// gives way to the object (read through S3), at the object's size; a copy
/// longer than the object is kept and not recorded as uploaded.
#[tokio::test]
async fn an_uploaded_chunk_replaces_a_short_complete_copy_never_a_longer_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = open_tiered(dir.path()).await;
    let (short, long) = (ChunkName::new("eu2", 0), ChunkName::new("eu2", 1));
    for c in [&short, &long] {
        s.replica_append("app", c, 0, Bytes::from_static(b"a\n"))
            .await
            .unwrap();
        s.replica_complete("app", c, 2).await.unwrap();
    }
    s.add_remote("app", &short, 4, 0, None).await.unwrap();
    let m = s.chunk_meta("app", &short).unwrap();
    assert!(m.complete && m.uploaded && !m.local && m.size == 4, "{m:?}");
    assert!(!dir.path().join("app").join(short.to_string()).exists());
    assert_eq!(
        s.add_remote("app", &long, 1, 0, None).await.unwrap(),
        TierOutcome::NotEligible
    );
    let m = s.chunk_meta("app", &long).unwrap();
    assert!(m.complete && !m.uploaded && m.local && m.size == 2, "{m:?}");
    s.shutdown().await;
    drop(s);
    let s = open_tiered(dir.path()).await;
    let m = s.chunk_meta("app", &short).unwrap();
    assert!(m.uploaded && !m.local && m.size == 4, "{m:?}");
    s.shutdown().await;
}

/// A copy that holds every byte of a chunk its owner uploaded before this
/// node saw it complete is completed and kept (recorded uploaded); a
/// shorter open copy gives way to the object.
#[tokio::test]
async fn an_open_copy_holding_the_whole_uploaded_chunk_is_completed_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let s = open_tiered(dir.path()).await;
    let (whole, short) = (ChunkName::new("eu2", 0), ChunkName::new("eu2", 1));
    for c in [&whole, &short] {
        s.replica_append("app", c, 0, Bytes::from_static(b"a\nb\n"))
            .await
            .unwrap();
    }
    s.add_remote("app", &whole, 4, 0, None).await.unwrap();
    let m = s.chunk_meta("app", &whole).unwrap();
    assert!(m.complete && m.uploaded && m.local && m.size == 4, "{m:?}");
    s.add_remote("app", &short, 6, 0, None).await.unwrap();
    let m = s.chunk_meta("app", &short).unwrap();
    assert!(m.complete && m.uploaded && !m.local && m.size == 6, "{m:?}");
    s.shutdown().await;
    drop(s);
    let s = open_tiered(dir.path()).await;
    let m = s.chunk_meta("app", &whole).unwrap();
    assert!(m.complete && m.uploaded && m.local && m.size == 4, "{m:?}");
    s.shutdown().await;
}
