//! Snapshot files: a magic header, a file format version, the [`StateSnapshot`] encoded
//! with bincode, then a 64-bit checksum of that body. Written to a temporary file in the
//! same directory, fsynced, then renamed over the target (and the directory fsynced), so a
//! crash leaves the old snapshot or the new one, never half of one.
//!
//! Reading checks the checksum before decoding anything, so a file damaged after it was
//! written (a bad disk, a botched copy) is refused as corrupt instead of restoring wrong
//! counts; and decoding runs under bincode's byte limit, sized to the body (see
//! [`decode_bounded`]), so a damaged length field is an error, not an allocation of up to
//! 2^64 bytes (bincode allocates a string's bytes before reading them, and an absurd length
//! aborted the process before the operator's `on_bad` choice could apply).

use std::io::{Read, Write};
use std::path::Path;

use crate::engine::{
    Cursor, CursorV2, EncodedSnapshot, Engine, KeptDecisionV3, Restored, SnapshotError,
    StateSnapshot, SNAPSHOT_FORMAT_V2, SNAPSHOT_FORMAT_V3,
};

const MAGIC: &[u8; 8] = b"FGSNAP\0\0";

/// Version of the file layout. 3: header, body, checksum of the body. 2 (read, for files
/// of the build before): header and body, no checksum. The body's own types are versioned
/// by [`crate::engine::SNAPSHOT_FORMAT`], inside it.
pub const FILE_FORMAT: u32 = 3;
const FILE_FORMAT_UNCHECKED: u32 = 2;

/// The checksum of a body: SipHash-1-3 under fixed keys (not a secret: it detects damage,
/// not tampering; the file is the owner's alone).
fn checksum() -> siphasher::sip::SipHasher13 {
    siphasher::sip::SipHasher13::new_with_keys(0x4647_534e_4150_2d63, 0x6865_636b_7375_6d33)
}

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
    // Also when there is no snapshot yet: a writer killed during the first write.
    remove_stale_temps(path);
    // A file that cannot be looked at (a directory without search permission) is an
    // error, not "no snapshot": starting empty, the next write would replace every count
    // it holds. A path under something that is not a directory holds nothing: the engine
    // starts, and every write fails, counted and alerted on.
    match path.try_exists() {
        Ok(true) => {}
        Ok(false) => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => return Ok(None),
        Err(e) => return Err(io(path)(e)),
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
    let tmp = temp_path(dir, path, std::process::id());
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
        let mut out = std::io::BufWriter::with_capacity(1 << 20, f);
        out.write_all(MAGIC)?;
        out.write_all(&FILE_FORMAT.to_le_bytes())?;
        let mut w = Summing {
            inner: out,
            bytes: 0,
            sum: checksum(),
        };
        snap.encode_body(&mut w).map_err(std::io::Error::other)?;
        let (mut out, sum) = (w.inner, w.sum);
        out.write_all(&std::hash::Hasher::finish(&sum).to_le_bytes())?;
        let bytes = 12 + w.bytes + 8;
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the directory is: a failure here is a failed
        // snapshot (the next one tries again), not a success that a power cut undoes.
        #[cfg(unix)]
        sync_dir(dir)?;
        Ok::<u64, std::io::Error>(bytes)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io(path))
}

/// fsyncs a directory. File systems that cannot sync a directory (some FUSE, network and
/// virtual file systems answer EINVAL or ENOTSUP) are not an error, as in PostgreSQL's
/// `fsync_fname`: there, the rename is as durable as it can be made.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let d = std::fs::File::open(dir)?;
    match d.sync_all() {
        // EINVAL and ENOTSUP / EOPNOTSUPP.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The temporary file [`write`] uses for `path` in this process.
fn temp_path(dir: &Path, path: &Path, pid: u32) -> std::path::PathBuf {
    dir.join(format!(
        ".{}.tmp-{pid}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
    ))
}

/// Removes temporary files that writers killed mid-write left beside `path` (each is as big
/// as a snapshot, and a restarted engine has another pid, so they were never reused). Only
/// files of processes that no longer exist: another live engine's write is left alone.
/// Linux only (`/proc`); best effort.
fn remove_stale_temps(path: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            match std::fs::remove_file(e.path()) {
                Ok(()) => tracing::info!(
                    file = %e.path().display(),
                    "removed the temporary file of a snapshot write that did not finish"
                ),
                Err(err) => tracing::warn!(
                    file = %e.path().display(),
                    error = %err,
                    "could not remove the temporary file of an unfinished snapshot write"
                ),
            }
        }
    }
}

/// A writer that counts and checksums what went through it.
struct Summing<W> {
    inner: W,
    bytes: u64,
    sum: siphasher::sip::SipHasher13,
}

impl<W: Write> Write for Summing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        std::hash::Hasher::write(&mut self.sum, &buf[..n]);
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
    if found != FILE_FORMAT && found != FILE_FORMAT_UNCHECKED {
        return Err(SnapshotFileError::Format {
            path: path.display().to_string(),
            found,
            expected: FILE_FORMAT,
        });
    }
    let corrupt = |message: String| SnapshotFileError::Corrupt {
        path: path.display().to_string(),
        message,
    };
    let mut body = Vec::new();
    f.read_to_end(&mut body).map_err(io(path))?;
    if found == FILE_FORMAT {
        let Some(at) = body.len().checked_sub(8) else {
            return Err(corrupt("too short to hold its checksum".into()));
        };
        let stored = u64::from_le_bytes(body[at..].try_into().expect("8 bytes"));
        body.truncate(at);
        let mut sum = checksum();
        std::hash::Hasher::write(&mut sum, &body);
        if std::hash::Hasher::finish(&sum) != stored {
            return Err(corrupt(
                "its checksum does not match: the file was damaged or changed after it was written"
                    .into(),
            ));
        }
    }
    // The body's format comes first (a varint: one byte below 251). Format 3 differs
    // from this one in its retry table only, format 2 in its cursor too.
    let decoded = match body.first() {
        Some(&f) if u32::from(f) == SNAPSHOT_FORMAT_V2 => {
            decode_bounded::<StateSnapshot<CursorV2, KeptDecisionV3>>(&body)
                .map(|(s, n)| (s.upgrade(), n))
        }
        Some(&f) if u32::from(f) == SNAPSHOT_FORMAT_V3 => {
            decode_bounded::<StateSnapshot<Cursor, KeptDecisionV3>>(&body)
                .map(|(s, n)| (s.upgrade(), n))
        }
        _ => decode_bounded::<StateSnapshot>(&body),
    };
    let (snap, used) = decoded.map_err(|e| corrupt(e.to_string()))?;
    if used != body.len() {
        return Err(SnapshotFileError::Corrupt {
            path: path.display().to_string(),
            message: format!("{} trailing bytes", body.len() - used),
        });
    }
    Ok(snap)
}

/// The most bincode charges its byte limit per byte it reads: it charges every value with
/// its size in memory, and a `u128` stored as a one-byte varint is charged 16 bytes
/// (strings are charged their length, one per byte).
const MAX_CHARGE_PER_BYTE: usize = 16;

/// The byte limit for a body of `len` bytes, as a power of two: the smallest even power at
/// or above the most a sound body of that length can be charged
/// (`len x MAX_CHARGE_PER_BYTE`), so at most 4 times that. `None`: beyond any snapshot.
fn limit_bits(len: usize) -> Option<u32> {
    let need = len.checked_mul(MAX_CHARGE_PER_BYTE)?.max(1);
    let bits = need.next_power_of_two().trailing_zeros().max(16);
    let bits = bits + (bits & 1);
    (bits <= MAX_LIMIT_BITS).then_some(bits)
}

#[cfg(target_pointer_width = "64")]
const MAX_LIMIT_BITS: u32 = 46;
#[cfg(not(target_pointer_width = "64"))]
const MAX_LIMIT_BITS: u32 = 30;

/// Decodes a body with bincode's byte limit set by [`limit_bits`]. bincode allocates a
/// string's bytes before reading them, and charges its length to the limit first: with the
/// limit, a damaged length is an error instead of an allocation of up to 2^64 bytes (which
/// aborted the process). A sound body is never refused: it is charged at most
/// `MAX_CHARGE_PER_BYTE` per byte. (The limit is a const parameter: one decoder per arm.)
fn decode_bounded<T: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    macro_rules! arms {
        ($($bits:literal)*) => {
            match limit_bits(body.len()) {
                $(
                    Some($bits) => bincode::serde::decode_from_slice(
                        body,
                        bincode::config::standard().with_limit::<{ 1usize << $bits }>(),
                    ),
                )*
                _ => Err(bincode::error::DecodeError::LimitExceeded),
            }
        };
    }
    #[cfg(target_pointer_width = "64")]
    return arms!(16 18 20 22 24 26 28 30 32 34 36 38 40 42 44 46);
    #[cfg(not(target_pointer_width = "64"))]
    return arms!(16 18 20 22 24 26 28 30);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::txn::Transaction;
    use rust_decimal::Decimal;

    fn shipped_engine() -> Engine {
        let cfg = crate::config::EngineConfig::default();
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
        Engine::new(crate::rules::load_dir(&rules, &cfg).unwrap(), cfg)
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fraudgate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// An engine with a few cards' windows and retry-table entries, saved to `path`.
    fn saved(path: &Path) -> Engine {
        let engine = shipped_engine();
        for i in 0..20 {
            let mut t = Transaction::new(
                format!("t{i}"),
                format!("41111111111111{:02}", i % 5),
                Decimal::new(100 + i, 0),
            );
            t.merchant = Some(format!("m{}", i % 3));
            t.ts_ms = Some(1_795_687_200_000 + i * 1_000);
            engine.decide(&t, 1_795_687_200_000 + i * 1_000);
        }
        save(&engine, path, 1_795_687_300_000, Cursor::default).unwrap();
        engine
    }

    fn with_checksum(body: &[u8]) -> Vec<u8> {
        let mut file = Vec::from(&MAGIC[..]);
        file.extend(FILE_FORMAT.to_le_bytes());
        file.extend(body);
        let mut sum = checksum();
        std::hash::Hasher::write(&mut sum, body);
        file.extend(std::hash::Hasher::finish(&sum).to_le_bytes());
        file
    }

    /// A length field damaged into an absurd size (with a checksum that matches, as if the
    /// damage happened before it was computed) is a corrupt snapshot: bincode used to
    /// allocate the string before reading it, and the process aborted before `on_bad`.
    #[test]
    fn an_absurd_length_is_corrupt_not_an_abort() {
        let dir = temp_dir("snaplen");
        let path = dir.join("state.snap");
        fn put<T: serde::Serialize>(body: &mut Vec<u8>, v: T) {
            body.extend(bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap());
        }
        let mut body = Vec::new();
        put(&mut body, crate::engine::SNAPSHOT_FORMAT);
        put(&mut body, 7u64); // key fingerprint
        put(&mut body, 1_000i64); // resolution
        put(&mut body, 1_795_687_300_000i64); // taken at
        put(&mut body, Cursor::default());
        put(&mut body, 1u64); // one group, whose signature's length is 2^62 bytes
        body.push(0xfd);
        body.extend((1u64 << 62).to_le_bytes());
        body.extend(b"card");
        std::fs::write(&path, with_checksum(&body)).unwrap();
        let err = read(&path).unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(err, SnapshotFileError::Corrupt { .. }), "{err}");
    }

    /// The limit covers the most a sound body can be charged, and not much more.
    #[test]
    fn the_decode_limit_covers_every_sound_body() {
        for len in [0, 1, 100, 4_095, 4_096, 4_097, 1 << 20, 40_000_000, 3 << 30] {
            let limit = 1usize << limit_bits(len).unwrap();
            assert!(limit >= len * MAX_CHARGE_PER_BYTE, "{len}");
            assert!(
                limit <= (len * MAX_CHARGE_PER_BYTE * 4).max(1 << 16),
                "{len}"
            );
        }
        assert_eq!(limit_bits(usize::MAX), None);
    }

    /// A snapshot of thousands of keys (window rows of small numbers, charged 8 bytes each
    /// for the one byte they take) reads back whole.
    #[test]
    fn a_snapshot_of_many_small_values_reads_back() {
        let dir = temp_dir("snapmany");
        let path = dir.join("state.snap");
        let engine = shipped_engine();
        for i in 0..5_000i64 {
            let mut t = Transaction::new(
                format!("m{i}"),
                format!("4111111111{:06}", i % 2_000),
                Decimal::new(1 + i % 7, 0),
            );
            t.merchant = Some(format!("m{}", i % 50));
            t.device = Some(format!("d{}", i % 300));
            t.ts_ms = Some(1_795_687_200_000 + i * 700);
            engine.decide(&t, 1_795_687_200_000 + i * 700);
        }
        save(&engine, &path, 1_795_690_800_000, Cursor::default).unwrap();
        let back = read(&path);
        let _ = std::fs::remove_dir_all(&dir);
        let snap = back.unwrap();
        assert_eq!(snap.dedupe.len(), 5_000);
        assert!(snap.groups.iter().map(|g| g.keys.len()).sum::<usize>() > 2_000);
    }

    /// One byte changed anywhere in a saved snapshot: refused as corrupt, with the reason,
    /// instead of restoring whatever the damaged bytes decode to.
    #[test]
    fn a_damaged_byte_is_caught_by_the_checksum() {
        let dir = temp_dir("snapsum");
        let path = dir.join("state.snap");
        saved(&path);
        let good = std::fs::read(&path).unwrap();
        assert!(read(&path).is_ok());
        // Byte by byte through the body, in steps (every one would take too long).
        let mut caught = 0;
        for at in (12..good.len()).step_by(good.len() / 40 + 1) {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            match read(&path) {
                Err(SnapshotFileError::Corrupt { message, .. }) => {
                    assert!(message.contains("checksum"), "{message}");
                    caught += 1;
                }
                other => panic!("byte {at} changed: {other:?}"),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(caught >= 20, "{caught}");
    }

    /// A snapshot written by the build before (file format 2: no checksum) is still read,
    /// so an upgrade keeps the windows.
    #[test]
    fn a_file_without_a_checksum_is_still_read() {
        let dir = temp_dir("snapold");
        let path = dir.join("state.snap");
        let engine = saved(&path);
        let snap = engine.snapshot(1_795_687_300_000, Cursor::default);
        let mut old = Vec::from(&MAGIC[..]);
        old.extend(FILE_FORMAT_UNCHECKED.to_le_bytes());
        snap.encode_body(&mut old).unwrap();
        std::fs::write(&path, &old).unwrap();
        let back = read(&path);
        let restored = shipped_engine().restore(back.unwrap());
        let _ = std::fs::remove_dir_all(&dir);
        let r = restored.unwrap();
        assert_eq!(r.ids, 20);
        assert!(r.keys > 0);
    }

    /// The saved engine's state as a snapshot of an earlier format (`cursor` of that
    /// format, the retry table without content fingerprints), written to `path`; read back.
    fn written_as_old<C: serde::Serialize>(
        engine: &Engine,
        path: &Path,
        format: u32,
        cursor: impl FnOnce(Cursor) -> C,
    ) -> StateSnapshot {
        let now = engine
            .snapshot(1_795_687_300_000, || Cursor {
                txn_next_seq: Some(42),
                check_from_ms: Some(7),
                txn_stream_created_ns: Some(99),
            })
            .decode()
            .unwrap();
        assert!(now.dedupe.iter().all(|k| k.fingerprint != 0));
        let old = StateSnapshot::<C, KeptDecisionV3> {
            format,
            key_fingerprint: now.key_fingerprint,
            resolution_ms: now.resolution_ms,
            taken_at_ms: now.taken_at_ms,
            cursor: cursor(now.cursor),
            groups: now.groups,
            dedupe: now
                .dedupe
                .into_iter()
                .map(|k| (k.id, k.at_ms, k.json))
                .collect(),
        };
        let body = bincode::serde::encode_to_vec(&old, bincode::config::standard()).unwrap();
        std::fs::write(path, with_checksum(&body)).unwrap();
        let back = read(path).unwrap();
        assert_eq!(back.format, crate::engine::SNAPSHOT_FORMAT);
        assert_eq!(back.dedupe.len(), 20);
        assert!(back.dedupe.iter().all(|k| k.fingerprint == 0));
        back
    }

    /// A body of format 2 (its cursor without the stream's creation time) is still read:
    /// the same state and positions, a stream identity that is unknown.
    #[test]
    fn a_format_2_body_is_still_read() {
        let dir = temp_dir("snapv2");
        let path = dir.join("state.snap");
        let engine = saved(&path);
        let back = written_as_old(&engine, &path, SNAPSHOT_FORMAT_V2, |c| CursorV2 {
            txn_next_seq: c.txn_next_seq,
            check_from_ms: c.check_from_ms,
        });
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            back.cursor,
            Cursor {
                txn_next_seq: Some(42),
                check_from_ms: Some(7),
                txn_stream_created_ns: None,
            }
        );
        let r = shipped_engine().restore(back).unwrap();
        assert_eq!(r.ids, 20);
        assert!(r.keys > 0);
    }

    /// A body of format 3 (its retry table without the transactions' content
    /// fingerprints) is still read: the same state and cursor; a transaction under one of
    /// its ids is taken for a retry whatever its content, as the build that wrote it did.
    /// The ids of a snapshot of this format keep their content.
    #[test]
    fn a_format_3_body_is_still_read() {
        let dir = temp_dir("snapv3");
        let path = dir.join("state.snap");
        let engine = saved(&path);
        let back = written_as_old(&engine, &path, SNAPSHOT_FORMAT_V3, |c| c);
        assert_eq!(back.cursor.txn_stream_created_ns, Some(99));
        let old = shipped_engine();
        let r = old.restore(back).unwrap();
        assert_eq!(r.ids, 20);
        assert!(r.keys > 0);
        // `t3` was 103.00 on card ...03 at merchant m0: sent again with another amount.
        let mut other = Transaction::new("t3", "4111111111111103", Decimal::new(999, 0));
        other.merchant = Some("m0".into());
        other.ts_ms = Some(1_795_687_203_000);
        let out = old.decide(&other, 1_795_687_210_000);
        assert!(out.duplicate && !out.id_reused);
        // That retry gave the entry its content: a third one is compared with it.
        other.amount = Decimal::new(998, 0);
        assert!(old.decide(&other, 1_795_687_211_000).id_reused);
        save(&engine, &path, 1_795_687_300_000, Cursor::default).unwrap();
        let current = shipped_engine();
        let back = read(&path);
        let _ = std::fs::remove_dir_all(&dir);
        current.restore(back.unwrap()).unwrap();
        let out = current.decide(&other, 1_795_687_210_000);
        assert!(out.id_reused && !out.duplicate);
    }

    /// Loading removes the temporary files of writers that died mid-write, and only theirs.
    #[cfg(target_os = "linux")]
    #[test]
    fn loading_removes_temp_files_of_dead_writers() {
        let dir = temp_dir("snaptmp");
        let path = dir.join("state.snap");
        saved(&path);
        let dead = temp_path(&dir, &path, 4_000_000_000);
        let live = temp_path(&dir, &path, 1);
        let other = dir.join(".other.snap.tmp-4000000000");
        for f in [&dead, &live, &other] {
            std::fs::write(f, b"partial").unwrap();
        }
        let loaded = load(&shipped_engine(), &path);
        let left = [&dead, &live, &other].map(|f| f.exists());
        // And when the first write was the one killed: no snapshot yet.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&dead, b"partial").unwrap();
        let first = load(&shipped_engine(), &path);
        let left_first = dead.exists();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(loaded.unwrap().is_some());
        assert_eq!(left, [false, true, true]);
        assert!(first.unwrap().is_none());
        assert!(!left_first, "the temp file of a first write killed stayed");
    }

    /// A path under a file holds no snapshot: the start goes on (every write fails and is
    /// counted, `tests/service.rs`). A directory that cannot be searched is an error
    /// instead, which these tests, run as root, cannot show.
    #[cfg(unix)]
    #[test]
    fn a_path_under_a_file_holds_no_snapshot() {
        let dir = temp_dir("snapdir");
        let file = dir.join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let loaded = load(&shipped_engine(), &file.join("state.snap"));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(loaded, Ok(None)), "{loaded:?}");
    }

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
