//! ACME state under `data_dir/acme/` (directory mode 0700, files 0600): the account
//! credentials, the certificate chain and its key. Every file is written whole to a
//! temporary name, synced and renamed over the old one, so a crash leaves either the
//! old file or the new one. The chain is renamed into place after its key; a chain
//! that does not match its key (a crash between the two renames) is refused when it is
//! loaded, and a new certificate is ordered.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use instant_acme::AccountCredentials;
use serde::{Deserialize, Serialize};

const DIR: &str = "acme";
const ACCOUNT: &str = "account.json";
const CERT: &str = "cert.pem";
const KEY: &str = "key.pem";
/// The account file is a few hundred bytes; anything much larger is not ours.
const MAX_ACCOUNT_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
}

/// The account file: which directory the account lives at, and its credentials
/// (the account URL and private key).
#[derive(Serialize, Deserialize)]
struct AccountFile {
    directory: String,
    credentials: AccountCredentials,
}

/// The files under `data_dir/acme/`.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(data_dir: &Path) -> Store {
        Store {
            dir: data_dir.join(DIR),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CERT)
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY)
    }

    fn account_path(&self) -> PathBuf {
        self.dir.join(ACCOUNT)
    }

    /// Whether a chain and a key are stored (they may still be unusable).
    pub fn has_certificate(&self) -> bool {
        self.cert_path().is_file() && self.key_path().is_file()
    }

    /// The stored account for `directory`; `None` when there is none, or it belongs to
    /// another directory (the CA changed), or the file is unreadable (then a new
    /// account replaces it; the reason is returned for the log).
    pub fn load_account(&self, directory: &str) -> Result<Option<AccountCredentials>, StoreError> {
        let path = self.account_path();
        let read_err = |reason: String| StoreError::Read {
            path: path.clone(),
            reason,
        };
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_err(e.to_string())),
        };
        let mut bytes = Vec::new();
        use std::io::Read;
        file.take(MAX_ACCOUNT_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| read_err(e.to_string()))?;
        // Never echo the file's content: it holds the account key.
        let parsed: AccountFile = serde_json::from_slice(&bytes)
            .map_err(|e| read_err(format!("not an account file (line {})", e.line())))?;
        Ok((parsed.directory == directory).then_some(parsed.credentials))
    }

    pub fn save_account(
        &self,
        directory: &str,
        credentials: AccountCredentials,
    ) -> Result<(), StoreError> {
        let file = AccountFile {
            directory: directory.to_string(),
            credentials,
        };
        let path = self.account_path();
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::Write {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        self.ensure_dir()?;
        write_atomic(&path, &bytes)
    }

    /// Stores a new chain and key, key first (see the module doc).
    pub fn save_certificate(&self, chain_pem: &str, key_pem: &str) -> Result<(), StoreError> {
        self.ensure_dir()?;
        write_atomic(&self.key_path(), key_pem.as_bytes())?;
        write_atomic(&self.cert_path(), chain_pem.as_bytes())
    }

    /// Creates the directory with mode 0700, or tightens an existing one to it.
    pub fn ensure_dir(&self) -> Result<(), StoreError> {
        let err = |e: std::io::Error| StoreError::Write {
            path: self.dir.clone(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(&self.dir).map_err(err)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700)).map_err(err)
    }
}

/// Writes `bytes` to `path` (mode 0600) through a synced temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let err = |p: &Path, e: std::io::Error| StoreError::Write {
        path: p.to_path_buf(),
        reason: e.to_string(),
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| err(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| err(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| err(path, e))?;
    // The rename itself survives a crash once the directory is synced.
    if let Some(parent) = path.parent() {
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
