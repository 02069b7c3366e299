//! The VERP envelope sender of each recipient's copy, and the key its MAC uses.
//!
//! The address form and MAC are [`crate::bounce::verp`]'s (one encoding, decoded by the
//! bounce stage); this module adds the configuration and the key file, which the bounce
//! stage reads through [`VerpSender::from_config`] / [`load_or_create_key`] as well.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::receipt::ReceiptId;

/// Builds VERP senders for one bounce domain with one key.
#[derive(Clone)]
pub struct VerpSender {
    key: Vec<u8>,
    local: String,
    domain: String,
}

impl std::fmt::Debug for VerpSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerpSender")
            .field("local", &self.local)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("VERP key file {path}: {source}")]
pub struct VerpKeyError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl VerpSender {
    pub fn new(key: Vec<u8>, local: &str, domain: &str) -> Self {
        Self {
            key,
            local: local.to_string(),
            domain: domain.to_string(),
        }
    }

    /// From config: `None` when no bounce domain is set (original senders are kept). The key
    /// comes from `delivery.verp_key_file`, else `data_dir/verp.key`, created on first use.
    pub fn from_config(config: &Config) -> Result<Option<Self>, VerpKeyError> {
        let d = &config.delivery;
        if d.bounce_domain.is_empty() {
            return Ok(None);
        }
        let path = d
            .verp_key_file
            .clone()
            .unwrap_or_else(|| config.data_dir.join("verp.key"));
        let key = load_or_create_key(&path)?;
        Ok(Some(Self::new(key, &d.bounce_local_part, &d.bounce_domain)))
    }

    /// The envelope sender for recipient `rcpt_index` of `receipt`.
    pub fn sender(&self, receipt: ReceiptId, rcpt_index: u32) -> String {
        crate::bounce::verp::encode(&self.key, &self.local, &self.domain, receipt, rcpt_index)
    }
}

/// Reads the key (file contents, surrounding whitespace ignored) or writes 32 random bytes
/// as hex to a new file readable by the owner only.
pub fn load_or_create_key(path: &Path) -> Result<Vec<u8>, VerpKeyError> {
    let err = |source| VerpKeyError {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let key = text.trim().as_bytes().to_vec();
            if key.is_empty() {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "key file is empty",
                )));
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(err)?;
            }
            let raw: [u8; 32] = rand::random();
            let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut f = options.open(path).map_err(err)?;
            f.write_all(hex.as_bytes()).map_err(err)?;
            f.write_all(b"\n").map_err(err)?;
            f.sync_all().map_err(err)?;
            Ok(hex.into_bytes())
        }
        Err(e) => Err(err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::bounce::verp::{decode, encode};

    #[test]
    fn sender_names_receipt_and_index_with_a_keyed_mac() {
        let r = ReceiptId::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let v = VerpSender::new(b"k1".to_vec(), "bounces", "b.example");
        let a = v.sender(r, 3);
        let tag = decode(b"k1", "bounces", "b.example", &a).unwrap();
        assert_eq!((tag.receipt, tag.rcpt_index), (r, 3));
        assert!(decode(b"k2", "bounces", "b.example", &a).is_err());
        let (local, domain) = a.rsplit_once('@').unwrap();
        assert_eq!(domain, "b.example");
        let parts: Vec<&str> = local.split(['+', '-']).collect();
        assert_eq!(parts[0], "bounces");
        assert_eq!(parts[1].parse::<ReceiptId>().unwrap(), r);
        assert_eq!(parts[2], "3");
        assert_eq!(parts[3].len(), 8);
        assert_ne!(a, encode(b"k2", "bounces", "b.example", r, 3));
        assert_ne!(a, encode(b"k1", "bounces", "b.example", r, 4));
        assert_eq!(a, encode(b"k1", "bounces", "b.example", r, 3));
    }

    #[test]
    fn key_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/verp.key");
        let k1 = load_or_create_key(&p).unwrap();
        assert_eq!(k1.len(), 64);
        assert_eq!(load_or_create_key(&p).unwrap(), k1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
