//! The rooms snapshot that lets a restart go unnoticed: what resume needs (rooms,
//! peer ids, names, media state, resume-token hashes, the id generator) as a small
//! JSON file under `data_dir`. Written atomically (temp file, fsync, rename, directory
//! fsync) with mode 0600; read back on start, where anything older than the resume
//! grace plus [`STALE_MARGIN`], malformed or of another format is ignored with a log
//! line. The core builds and checks the contents ([`super::core::Rooms::snapshot`],
//! [`super::core::Rooms::restore`]); this module only moves bytes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::proto::Media;

/// The snapshot's file name under `data_dir`.
pub const FILE: &str = "rooms.json";
/// Bumped when the layout changes; a file of another format is ignored.
pub const FORMAT: u32 = 1;
/// How long after the resume grace a snapshot is still restored: time for the process
/// to stop and start again.
pub const STALE_MARGIN: Duration = Duration::from_secs(15);
/// Largest snapshot file read back (a file larger than this is not one we wrote).
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// How often a changed state is written while running (for crashes; a clean stop
/// writes it once more).
pub const SAVE_EVERY: Duration = Duration::from_secs(2);

/// Everything restored after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: u32,
    /// When it was taken (Unix milliseconds): an old one is ignored.
    pub saved_unix_ms: u64,
    /// The peer id generator (key and counter), so new ids never repeat restored ones.
    pub id_key: [u64; 4],
    pub id_next: u64,
    /// Every peer, grouped by room in each room's join order.
    pub peers: Vec<SavedPeer>,
    /// Each room's control state (protocol 1.1; absent in older files).
    #[serde(default)]
    pub rooms: Vec<SavedRoom>,
}

/// A room's control state as saved (lobby waiters are not: their sockets close with
/// the process, and they knock again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedRoom {
    pub name: String,
    pub locked: bool,
    pub lobby: bool,
    /// Hex salt and hex salted SHA-256 of the room password, if one is set.
    pub password: Option<(String, String)>,
}

/// One peer as saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedPeer {
    pub id: String,
    pub room: String,
    pub name: String,
    pub media: Option<Media>,
    /// Hex SHA-256 of the current resume token (the token itself is never stored).
    pub token_sha256: String,
    /// A host of its room (protocol 1.1; absent in older files).
    #[serde(default)]
    pub host: bool,
}

/// Why a snapshot file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path} is not a rooms snapshot: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Writes `snap` to `dir/rooms.json` so that a crash at any point leaves either the
/// old file or the new one, never a torn one.
pub fn save(dir: &Path, snap: &Snapshot) -> io::Result<()> {
    let bytes = serde_json::to_vec(snap).map_err(io::Error::other)?;
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{FILE}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(FILE))?;
    // The rename itself is durable only once the directory is synced.
    File::open(dir)?.sync_all()
}

/// Reads `dir/rooms.json`; `Ok(None)` when there is none.
pub fn load(dir: &Path) -> Result<Option<Snapshot>, LoadError> {
    let path = dir.join(FILE);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LoadError::Read { path, source }),
    };
    let mut bytes = Vec::new();
    if let Err(source) = f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes) {
        return Err(LoadError::Read { path, source });
    }
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(LoadError::TooLarge { path });
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| LoadError::Parse { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sample() -> Snapshot {
        Snapshot {
            format: FORMAT,
            saved_unix_ms: 1_700_000_000_000,
            id_key: [1, 2, 3, 4],
            id_next: 9,
            peers: vec![SavedPeer {
                id: "0123456789abcdef".into(),
                room: "r".into(),
                name: "Ann".into(),
                media: Some(Media {
                    audio: true,
                    video: false,
                    screen: false,
                    recording: true,
                }),
                token_sha256: "00".repeat(32),
                host: true,
            }],
            rooms: vec![SavedRoom {
                name: "r".into(),
                locked: true,
                lobby: false,
                password: None,
            }],
        }
    }

    #[test]
    fn saves_privately_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        save(dir.path(), &sample()).unwrap();
        let mode = fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.path().join(format!("{FILE}.tmp")).exists());
        assert_eq!(load(dir.path()).unwrap(), Some(sample()));
        // Saving again replaces it.
        let mut s = sample();
        s.peers.clear();
        save(dir.path(), &s).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(s));
    }

    #[test]
    fn media_saved_before_recording_existed_loads_as_not_recording() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = serde_json::to_string(&sample()).unwrap();
        text = text.replace(",\"recording\":true", "");
        assert!(!text.contains("recording"));
        fs::write(dir.path().join(FILE), text).unwrap();
        let loaded = load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.peers[0].media.map(|m| m.recording), Some(false));
        assert_eq!(sample().peers[0].media.map(|m| m.recording), Some(true));
    }

    #[test]
    fn corrupt_or_huge_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), b"{\"format\":1,\"peers\":[").unwrap();
        assert!(matches!(load(dir.path()), Err(LoadError::Parse { .. })));
        fs::write(dir.path().join(FILE), b"\x00\xff garbage").unwrap();
        assert!(matches!(load(dir.path()), Err(LoadError::Parse { .. })));
        let f = File::create(dir.path().join(FILE)).unwrap();
        f.set_len(MAX_FILE_BYTES + 1).unwrap();
        assert!(matches!(load(dir.path()), Err(LoadError::TooLarge { .. })));
    }
}
