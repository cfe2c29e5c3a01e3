//! Persisted high-water mark of a [`HybridClock`](super::HybridClock): the narrow
//! trait, a file implementation for production, and an in-memory one for tests.
//!
//! This module owns the on-disk format of the high-water file. It must never leave a
//! half-written file where the clock would read it (writes go to a temporary file that
//! is fsynced and then renamed over the old one), and it must never turn a file it
//! cannot parse into "no high-water mark": that would let a restarted clock reissue
//! old timestamps, so an unreadable file is a [`HlcError::Corruption`].

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use super::{Hlc, HlcError};

/// First line of every high-water file.
const MAGIC: &str = "pgmesh-hlc-high-water";
/// Format version this build writes and reads.
const FORMAT_VERSION: u32 = 1;

/// Where a durable clock keeps its ceiling. Both calls are on the clock's cold path:
/// `load` once at startup, `store` about once per reservation window.
pub trait HighWaterStore: Send + Sync + fmt::Debug {
    /// The last stored ceiling, or `None` if nothing was ever stored.
    fn load(&self) -> Result<Option<Hlc>, HlcError>;
    /// Durably replaces the ceiling. When this returns `Ok`, a crash must not lose it.
    fn store(&self, hlc: Hlc) -> Result<(), HlcError>;
}

/// A high-water mark kept in one small text file:
///
/// ```text
/// pgmesh-hlc-high-water
/// format 1
/// ceiling 1732270001123.0 113524347748745216
/// ```
///
/// The ceiling appears twice, readable and raw; the two must agree, which catches a
/// damaged digit. A missing file means "never stored".
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// A store at `path`. Nothing is touched until the first load or store.
    pub fn new(path: impl Into<PathBuf>) -> FileStore {
        FileStore { path: path.into() }
    }

    /// The high-water file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_error(&self, op: &'static str) -> impl FnOnce(io::Error) -> HlcError + '_ {
        move |source| HlcError::Io {
            path: self.path.clone(),
            op,
            source,
        }
    }

    fn corruption(&self, reason: impl Into<String>) -> HlcError {
        HlcError::Corruption {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn parse(&self, bytes: &[u8]) -> Result<Hlc, HlcError> {
        let text = std::str::from_utf8(bytes).map_err(|_| self.corruption("not UTF-8"))?;
        let mut lines = text.split('\n');
        if lines.next() != Some(MAGIC) {
            return Err(self.corruption("missing magic header"));
        }
        let found = lines
            .next()
            .and_then(|line| line.strip_prefix("format "))
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| self.corruption("missing format line"))?;
        if found != FORMAT_VERSION {
            return Err(HlcError::UnsupportedVersion {
                path: self.path.clone(),
                found,
                supported: FORMAT_VERSION,
            });
        }
        let (readable, raw) = lines
            .next()
            .and_then(|line| line.strip_prefix("ceiling "))
            .and_then(|rest| rest.split_once(' '))
            .ok_or_else(|| self.corruption("missing ceiling line"))?;
        let readable: Hlc = readable
            .parse()
            .map_err(|_| self.corruption("unreadable ceiling"))?;
        let raw: u64 = raw
            .parse()
            .map_err(|_| self.corruption("unreadable raw ceiling"))?;
        if readable.as_u64() != raw {
            return Err(self.corruption("ceiling and raw ceiling disagree"));
        }
        // Exactly one trailing newline, nothing after it.
        if lines.next() != Some("") || lines.next().is_some() {
            return Err(self.corruption("unexpected data after the ceiling"));
        }
        Ok(readable)
    }

    /// Path of the temporary file, in the same directory so that rename is atomic.
    fn temp_path(&self) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        self.path.with_file_name(name)
    }
}

impl HighWaterStore for FileStore {
    fn load(&self) -> Result<Option<Hlc>, HlcError> {
        match fs::read(&self.path) {
            Ok(bytes) => self.parse(&bytes).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_error("read")(e)),
        }
    }

    fn store(&self, hlc: Hlc) -> Result<(), HlcError> {
        let text = format!(
            "{MAGIC}\nformat {FORMAT_VERSION}\nceiling {hlc} {}\n",
            hlc.as_u64()
        );
        let temp = self.temp_path();
        let mut file = File::create(&temp).map_err(self.io_error("create temp file"))?;
        file.write_all(text.as_bytes())
            .map_err(self.io_error("write temp file"))?;
        file.sync_all().map_err(self.io_error("fsync temp file"))?;
        drop(file);
        fs::rename(&temp, &self.path).map_err(self.io_error("rename"))?;
        sync_parent_dir(&self.path).map_err(self.io_error("fsync directory"))
    }
}

/// Makes the rename itself durable. Directories cannot be opened for fsync on every
/// platform; where they cannot, the rename is as durable as the platform allows.
#[cfg(unix)]
fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_parent_dir(_path: &Path) -> io::Result<()> {
    Ok(())
}

/// An in-memory store for tests. Clones share the same value, so a test can "restart"
/// a clock by opening a new one on a clone, and can make writes fail on demand.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<MemoryInner>>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    value: Option<Hlc>,
    writes: u64,
    failing: bool,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// The stored ceiling.
    pub fn value(&self) -> Option<Hlc> {
        self.lock().value
    }

    /// How many successful `store` calls there were.
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// While `true`, `store` fails with an I/O error and changes nothing.
    pub fn set_failing(&self, failing: bool) {
        self.lock().failing = failing;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl HighWaterStore for MemoryStore {
    fn load(&self) -> Result<Option<Hlc>, HlcError> {
        Ok(self.lock().value)
    }

    fn store(&self, hlc: Hlc) -> Result<(), HlcError> {
        let mut inner = self.lock();
        if inner.failing {
            return Err(HlcError::Io {
                path: PathBuf::from("<memory>"),
                op: "store",
                source: io::Error::other("injected failure"),
            });
        }
        inner.value = Some(hlc);
        inner.writes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_in(dir: &tempfile::TempDir) -> FileStore {
        FileStore::new(dir.path().join("hlc.high-water"))
    }

    #[test]
    fn missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(store_in(&dir).load().unwrap(), None);
    }

    #[test]
    fn store_then_load_round_trips_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(&dir);
        store.store(Hlc::from_parts(1_732_270_000_123, 5)).unwrap();
        store.store(Hlc::from_parts(1_732_270_001_123, 0)).unwrap();
        assert_eq!(
            store.load().unwrap(),
            Some(Hlc::from_parts(1_732_270_001_123, 0))
        );
        assert!(
            !store.temp_path().exists(),
            "temp file must be renamed away"
        );
        let text = fs::read_to_string(store.path()).unwrap();
        assert!(
            text.starts_with("pgmesh-hlc-high-water\nformat 1\n"),
            "{text}"
        );
    }

    #[test]
    fn damaged_files_are_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(&dir);
        let good = "pgmesh-hlc-high-water\nformat 1\nceiling 1.2 65538\n";
        fs::write(store.path(), good).unwrap();
        assert_eq!(store.load().unwrap(), Some(Hlc::from_parts(1, 2)));

        let damaged: [&[u8]; 9] = [
            b"",
            b"pgmesh-hlc-high-water\n",
            b"other-magic\nformat 1\nceiling 1.2 65538\n",
            b"pgmesh-hlc-high-water\nformat x\nceiling 1.2 65538\n",
            b"pgmesh-hlc-high-water\nformat 1\nceiling 1.2 65539\n",
            b"pgmesh-hlc-high-water\nformat 1\nceiling 1.2\n",
            b"pgmesh-hlc-high-water\nformat 1\nceiling 1.2 65538",
            b"pgmesh-hlc-high-water\nformat 1\nceiling 1.2 65538\nextra\n",
            b"pgmesh-hlc-high-water\nformat 1\nceiling \xff 65538\n",
        ];
        for bytes in damaged {
            fs::write(store.path(), bytes).unwrap();
            let err = store.load().unwrap_err();
            assert!(err.is_corruption(), "{bytes:?}: {err}");
        }
    }

    #[test]
    fn newer_format_is_not_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(&dir);
        fs::write(store.path(), "pgmesh-hlc-high-water\nformat 2\nwhatever\n").unwrap();
        let err = store.load().unwrap_err();
        assert!(
            matches!(
                err,
                HlcError::UnsupportedVersion {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn unwritable_directory_is_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("missing-dir").join("hlc"));
        let err = store.store(Hlc::from_parts(1, 0)).unwrap_err();
        assert!(
            matches!(
                err,
                HlcError::Io {
                    op: "create temp file",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn memory_store_failure_injection() {
        let store = MemoryStore::new();
        store.set_failing(true);
        assert!(store.store(Hlc::from_parts(1, 0)).is_err());
        assert_eq!((store.value(), store.writes()), (None, 0));
        store.set_failing(false);
        store.store(Hlc::from_parts(1, 0)).unwrap();
        assert_eq!(store.clone().load().unwrap(), Some(Hlc::from_parts(1, 0)));
    }
}
