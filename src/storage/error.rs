use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use chunkbus_client::NameError;

/// Errors of the storage layer. Cheap to clone, so that one failed write can
/// be reported to every request it carried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// A name failed validation; no path was built from it.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The category does not exist on this node.
    #[error("category {0:?} does not exist on this node")]
    UnknownCategory(String),
    /// The chunk does not exist on this node.
    #[error("chunk {chunk} of category {category:?} does not exist on this node")]
    UnknownChunk {
        /// Category.
        category: String,
        /// Chunk name.
        chunk: String,
    },
    /// A read offset that does not start a line.
    #[error("offset {offset} is not at the start of a line of chunk {chunk}")]
    NotLineBoundary {
        /// Chunk name.
        chunk: String,
        /// The offset asked for.
        offset: u64,
    },
    /// A read offset past the bytes this node holds.
    #[error("offset {offset} is past the end of chunk {chunk}, which holds {size} bytes here")]
    OffsetPastEnd {
        /// Chunk name.
        chunk: String,
        /// The offset asked for.
        offset: u64,
        /// Bytes held.
        size: u64,
    },
    /// The file system is full (ENOSPC or quota); nothing of the write was kept.
    #[error("the disk holding the data directory is full ({0}); nothing was written")]
    DiskFull(Arc<io::Error>),
    /// The process or the system has no file descriptor left (EMFILE,
    /// ENFILE); nothing of the write was kept. Retryable: descriptors come
    /// back as connections close and idle chunk files are closed.
    #[error("{context}: the node has too many open files ({source}); try again later")]
    OutOfFiles {
        /// What the storage was doing.
        context: String,
        /// The OS error.
        source: Arc<io::Error>,
    },
    /// Disk usage is above `--disk-high-water`; writes are shed until it drops.
    #[error(
        "disk usage is {used_percent}%, above the high-water mark of {limit_percent}% (--disk-high-water); try again later"
    )]
    HighWater {
        /// Current usage.
        used_percent: u8,
        /// Configured limit.
        limit_percent: u8,
    },
    /// Another process holds the data directory.
    #[error("data directory {dir} is in use by another chunkbus process{}; stop it or choose another --data-dir", pid.as_ref().map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The pid written in the lock file, if readable.
        pid: Option<String>,
    },
    /// The owner's chunk index space (9 digits) is used up in this category.
    #[error("node {node} has used every chunk index of category {category:?}")]
    IndexExhausted {
        /// Category.
        category: String,
        /// Node.
        node: String,
    },
    /// A replica write aimed at a chunk this node owns.
    #[error("chunk {chunk} belongs to this node; only its owner writes to it")]
    OwnChunk {
        /// Chunk name.
        chunk: String,
    },
    /// A replica write that does not continue the copy held here.
    #[error("copy of chunk {chunk} holds {size} bytes here, not {offset}")]
    ReplicaGap {
        /// Chunk name.
        chunk: String,
        /// Offset of the write.
        offset: u64,
        /// Bytes held.
        size: u64,
    },
    /// The owner lists a chunk with fewer bytes than the copy held here:
    /// the owner lost bytes (a power failure, a wiped disk) or reused the
    /// name. The copy is kept as it is; nothing is cut back.
    #[error(
        "copy of chunk {chunk} holds {held} bytes here, more than the {owner_size} its owner lists; the copy is kept as it is"
    )]
    CopyDisagrees {
        /// Chunk name.
        chunk: String,
        /// Bytes held here.
        held: u64,
        /// Bytes the owner lists.
        owner_size: u64,
    },
    /// A write would create a category past `--max-categories`.
    #[error(
        "category {category:?} does not exist and this node holds its limit of {limit} categories (--max-categories); nothing was written"
    )]
    TooManyCategories {
        /// The category asked for.
        category: String,
        /// The limit.
        limit: usize,
    },
    /// A restore from peers aimed at a chunk that is not this node's, is
    /// held here already, or whose index was not reserved first.
    #[error(
        "chunk {chunk} cannot be restored here: it is held already, not this node's, or not reserved"
    )]
    NotRestorable {
        /// Chunk name.
        chunk: String,
    },
    /// The chunk was evicted here and the object store does not have it
    /// (deleted by a bucket lifecycle rule or by hand).
    #[error(
        "chunk {chunk} of category {category:?} was evicted from this node and is no longer in the object store"
    )]
    RemoteMissing {
        /// Category.
        category: String,
        /// Chunk name.
        chunk: String,
    },
    /// The object store could not serve an evicted chunk.
    #[error("cannot read evicted chunk {chunk} from the object store: {message}")]
    Remote {
        /// Chunk name.
        chunk: String,
        /// Why.
        message: String,
    },
    /// The node does not take writes yet.
    #[error("{0}; try again shortly")]
    NotReady(String),
    /// The node is stopping and takes no more writes.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// Any other I/O failure, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What the storage was doing.
        context: String,
        /// The OS error.
        #[source]
        source: Arc<io::Error>,
    },
}

impl StorageError {
    /// Wraps an I/O error; a full disk or exhausted quota becomes
    /// [`StorageError::DiskFull`], running out of file descriptors
    /// [`StorageError::OutOfFiles`].
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        if matches!(
            source.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        ) {
            return StorageError::DiskFull(Arc::new(source));
        }
        let no_files = [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE];
        if no_files
            .iter()
            .any(|e| source.raw_os_error() == Some(e.raw_os_error()))
        {
            return StorageError::OutOfFiles {
                context: context.into(),
                source: Arc::new(source),
            };
        }
        StorageError::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }
}
