//! Snapshot files: a magic header, a format version, then the [`StateSnapshot`] encoded
//! with bincode. Written to a temporary file in the same directory, fsynced, then renamed
//! over the target (and the directory fsynced), so a crash leaves the old snapshot or the
//! new one, never half of one.

use std::io::{Read, Write};
use std::path::Path;

use crate::engine::{
    Cursor, EncodedSnapshot, Engine, Restored, SnapshotError, StateSnapshot, SNAPSHOT_FORMAT,
};

const MAGIC: &[u8; 8] = b"FGSNAP\0\0";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    #[error("snapshot {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a fraudgate snapshot")]
    NotASnapshot { path: String },
    #[error("snapshot {path} has format {found}; this build reads format {expected}")]
    Format {
        path: String,
        found: u32,
        expected: u32,
    },
    #[error("snapshot {path} is corrupt: {message}")]
    Corrupt { path: String, message: String },
    #[error("snapshot {path} does not fit this engine: {source}")]
    Incompatible { path: String, source: SnapshotError },
}

/// Takes a point-in-time copy of the engine's state ([`Engine::snapshot`]; `at_cut`
/// records where the inputs stood at the cut) and writes it to `path`; returns the bytes
/// written and the cursor. Decisions go on during the copy; encoding and IO happen after
/// it. Call it off the async runtime.
pub fn save(
    engine: &Engine,
    path: &Path,
    taken_at_ms: i64,
    at_cut: impl FnOnce() -> Cursor,
) -> Result<(u64, Cursor), SnapshotFileError> {
    let snap = engine.snapshot(taken_at_ms, at_cut);
    let cursor = snap.header.cursor;
    Ok((write(path, &snap)?, cursor))
}

/// Reads the snapshot at `path` into `engine`. `Ok(None)` when there is no file yet.
pub fn load(engine: &Engine, path: &Path) -> Result<Option<Restored>, SnapshotFileError> {
    if !path.exists() {
        return Ok(None);
    }
    let snap = read(path)?;
    engine
        .restore(snap)
        .map(Some)
        .map_err(|source| SnapshotFileError::Incompatible {
            path: path.display().to_string(),
            source,
        })
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SnapshotFileError + '_ {
    move |source| SnapshotFileError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `snap` to `path` atomically; returns the bytes written.
pub fn write(path: &Path, snap: &EncodedSnapshot) -> Result<u64, SnapshotFileError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        // Owner-only: the file holds the retry table's decisions (masked cards, merchants,
        // amounts) and every key's history. A stale temp file of a crashed writer with this
        // pid goes first, as opening it would keep its permissions.
        let _ = std::fs::remove_file(&tmp);
        let mut open = std::fs::OpenOptions::new();
        open.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
        let f = open.open(&tmp)?;
        let mut w = Counting {
            inner: std::io::BufWriter::with_capacity(1 << 20, f),
            bytes: 0,
        };
        w.write_all(MAGIC)?;
        w.write_all(&SNAPSHOT_FORMAT.to_le_bytes())?;
        snap.encode_body(&mut w).map_err(std::io::Error::other)?;
        let bytes = w.bytes;
        let f = w.inner.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok::<u64, std::io::Error>(bytes)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io(path))
}

/// A writer that counts what went through it.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads a snapshot file, with a clear error for anything that is not a complete snapshot
/// of this format.
pub fn read(path: &Path) -> Result<StateSnapshot, SnapshotFileError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut head = [0u8; 12];
    if f.read_exact(&mut head).is_err() || &head[..8] != MAGIC {
        return Err(SnapshotFileError::NotASnapshot {
            path: path.display().to_string(),
        });
    }
    let found = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if found != SNAPSHOT_FORMAT {
        return Err(SnapshotFileError::Format {
            path: path.display().to_string(),
            found,
            expected: SNAPSHOT_FORMAT,
        });
    }
    let mut body = Vec::new();
    f.read_to_end(&mut body).map_err(io(path))?;
    let (snap, used): (StateSnapshot, usize) =
        bincode::serde::decode_from_slice(&body, bincode::config::standard()).map_err(|e| {
            SnapshotFileError::Corrupt {
                path: path.display().to_string(),
                message: e.to_string(),
            }
        })?;
    if used != body.len() {
        return Err(SnapshotFileError::Corrupt {
            path: path.display().to_string(),
            message: format!("{} trailing bytes", body.len() - used),
        });
    }
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The snapshot is readable by its owner only, whatever the umask.
    #[cfg(unix)]
    #[test]
    fn the_file_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let cfg = crate::config::EngineConfig::default();
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
        let engine = Engine::new(crate::rules::load_dir(&rules, &cfg).unwrap(), cfg);
        let dir = std::env::temp_dir().join(format!("fraudgate-snapmode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.snap");
        // An older file and a stale temp file of this pid, both with wider permissions:
        // neither's permissions carry over, whatever the umask.
        let stale = dir.join(format!(".state.snap.tmp-{}", std::process::id()));
        for f in [&path, &stale] {
            std::fs::write(f, b"old").unwrap();
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let written = save(&engine, &path, 1_000, Cursor::default);
        let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o777);
        let _ = std::fs::remove_dir_all(&dir);
        written.unwrap();
        assert_eq!(mode.unwrap(), 0o600);
    }
}
