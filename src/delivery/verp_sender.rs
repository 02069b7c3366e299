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

    /// From config: `None` when no bounce domain is set (original senders are kept).
    pub fn from_config(config: &Config) -> Result<Option<Self>, VerpKeyError> {
        let d = &config.delivery;
        Ok(key_for(config)?.map(|key| Self::new(key, &d.bounce_local_part, &d.bounce_domain)))
    }

    /// The envelope sender for recipient `rcpt_index` of `receipt`.
    pub fn sender(&self, receipt: ReceiptId, rcpt_index: u32) -> String {
        crate::bounce::verp::encode(&self.key, &self.local, &self.domain, receipt, rcpt_index)
    }
}

/// Reads the key (file contents, surrounding whitespace ignored) or writes 32 random bytes
/// as hex to a new file readable by the owner only.
/// The VERP key when a bounce domain is set: from `delivery.verp_key_file`, which must
/// exist, else from `data_dir/verp.key`, created on first use.
pub fn key_for(config: &Config) -> Result<Option<Vec<u8>>, VerpKeyError> {
    if config.delivery.bounce_domain.is_empty() {
        return Ok(None);
    }
    match &config.delivery.verp_key_file {
        Some(path) => load_key(path).map(Some),
        None => load_or_create_key(&config.data_dir.join("verp.key")).map(Some),
    }
}

/// The key in a file the admin named (`[delivery] verp_key_file`): it must exist. Were it
/// made up when missing (a typo, a secrets mount not yet there), every VERP address already
/// sent would fail its MAC and the bounces for them be refused.
pub fn load_key(path: &Path) -> Result<Vec<u8>, VerpKeyError> {
    let bytes = std::fs::read(path).map_err(|source| VerpKeyError {
        path: path.to_path_buf(),
        source,
    })?;
    key_from(&bytes).map_err(|source| VerpKeyError {
        path: path.to_path_buf(),
        source,
    })
}

/// Shortest key taken: 16 bytes (128 bits); the generated ones are 64 hex digits.
const MIN_KEY_LEN: usize = 16;

/// The key is the file's text without surrounding whitespace.
fn key_from(bytes: &[u8]) -> Result<Vec<u8>, std::io::Error> {
    let text = String::from_utf8_lossy(bytes);
    let key = text.trim().as_bytes().to_vec();
    if key.len() < MIN_KEY_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "the key is {} bytes; at least {MIN_KEY_LEN} are needed (delete the file to \
                 have a new one made, which invalidates VERP addresses already sent)",
                key.len()
            ),
        ));
    }
    Ok(key)
}

pub fn load_or_create_key(path: &Path) -> Result<Vec<u8>, VerpKeyError> {
    let err = |source| VerpKeyError {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => key_from(&bytes).map_err(err),
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

    #[test]
    fn a_key_file_the_admin_named_must_exist_and_hold_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::parse("[delivery]\nbounce_domain = \"b.example\"").unwrap();
        config.data_dir = dir.path().to_path_buf();
        let missing = dir.path().join("secrets/verp.key");
        config.delivery.verp_key_file = Some(missing.clone());
        assert!(key_for(&config).is_err());
        assert!(!missing.exists() && !dir.path().join("secrets").exists());
        std::fs::create_dir(dir.path().join("secrets")).unwrap();
        std::fs::write(&missing, "short\n").unwrap();
        let e = key_for(&config).unwrap_err();
        assert!(e.to_string().contains("at least 16"), "{e}");
        std::fs::write(&missing, "0123456789abcdef0123\n").unwrap();
        assert_eq!(key_for(&config).unwrap().unwrap(), b"0123456789abcdef0123");
        // Without the key set, data_dir/verp.key is made.
        config.delivery.verp_key_file = None;
        assert_eq!(key_for(&config).unwrap().unwrap().len(), 64);
    }
}
