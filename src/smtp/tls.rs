//! The inbound TLS server config (STARTTLS and implicit TLS): the PEM certificate chain and key
//! from the config, or a self-signed pair generated with rcgen into `data_dir/tls/` at first
//! start and reused afterwards (so clients that pin it keep working across restarts).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("certificate {cert} and key {key} do not go together: {message}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("config key {key}: {source}")]
    Key {
        key: &'static str,
        source: Box<TlsError>,
    },
}

/// Where the generated pair lives.
pub fn generated_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// Builds the server config from `smtp.tls_cert`/`smtp.tls_key`, or from the generated pair.
pub fn server_config(config: &Config) -> Result<Arc<ServerConfig>, TlsError> {
    let (cert_path, key_path) = match (&config.smtp.tls_cert, &config.smtp.tls_key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => {
            let (cert, key) = generated_paths(&config.data_dir);
            if !cert.exists() || !key.exists() {
                generate_self_signed(&config.hostname, &cert, &key)?;
            }
            (cert, key)
        }
    };
    // Errors name the key that points at the file, when the file is the admin's.
    let named = |key: &'static str| {
        move |e: TlsError| match config.smtp.tls_cert {
            Some(_) => TlsError::Key {
                key,
                source: Box::new(e),
            },
            None => e,
        }
    };
    let certs = read_certs(&cert_path).map_err(named("smtp.tls_cert"))?;
    let key = read_key(&key_path).map_err(named("smtp.tls_key"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Pair {
            cert: cert_path.clone(),
            key: key_path.clone(),
            message: e.to_string(),
        })?;
    Ok(Arc::new(server))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            message: "no CERTIFICATE block found".to_string(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        message: match e {
            // A certificate where the key should be said only "no items found".
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PRIVATE KEY block found (is this the certificate?)".to_string()
            }
            e => e.to_string(),
        },
    })
}

fn generate_self_signed(hostname: &str, cert: &Path, key: &Path) -> Result<(), TlsError> {
    let pair = rcgen::generate_simple_self_signed(vec![hostname.to_string()])
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    if let Some(dir) = cert.parent() {
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    write_private(key, pair.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(cert, pair.cert.pem()).map_err(|source| TlsError::Write {
        path: cert.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// Writes the key readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = options.open(path).map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

/// `TLSv1_3` / `TLSv1_2`, as stored with the message.
pub fn version_name(version: Option<rustls::ProtocolVersion>) -> String {
    match version {
        Some(v) => format!("{v:?}"),
        None => "TLS".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_in(dir: &Path) -> Config {
        Config {
            data_dir: dir.to_path_buf(),
            hostname: "mx.test".into(),
            ..Config::default()
        }
    }

    #[test]
    fn generates_self_signed_pair_once_and_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        server_config(&config).unwrap();
        let (cert, key) = generated_paths(dir.path());
        let first = std::fs::read(&cert).unwrap();
        server_config(&config).unwrap();
        assert_eq!(
            std::fs::read(&cert).unwrap(),
            first,
            "certificate was regenerated"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
        }
    }

    #[test]
    fn loads_configured_pem_files() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        generate_self_signed("other.test", &cert, &key).unwrap();
        let mut config = config_in(&dir.path().join("data"));
        config.smtp.tls_cert = Some(cert);
        config.smtp.tls_key = Some(key);
        server_config(&config).unwrap();
        assert!(!generated_paths(&config.data_dir).0.exists());
    }

    #[test]
    fn a_key_of_another_certificate_names_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let other_key = dir.path().join("k2.pem");
        generate_self_signed("one.test", &cert, &key).unwrap();
        generate_self_signed("two.test", &dir.path().join("c2.pem"), &other_key).unwrap();
        let mut config = config_in(dir.path());
        config.smtp.tls_cert = Some(cert);
        config.smtp.tls_key = Some(other_key);
        let err = server_config(&config).unwrap_err().to_string();
        assert!(err.contains("c.pem") && err.contains("k2.pem"), "{err}");
    }

    #[test]
    fn a_missing_certificate_or_a_certificate_for_a_key_names_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        generate_self_signed("one.test", &cert, &key).unwrap();
        let mut config = config_in(dir.path());
        config.smtp.tls_cert = Some(dir.path().join("nope.pem"));
        config.smtp.tls_key = Some(key);
        let err = server_config(&config).unwrap_err().to_string();
        assert!(
            err.contains("smtp.tls_cert") && err.contains("nope.pem"),
            "{err}"
        );
        config.smtp.tls_cert = Some(cert.clone());
        config.smtp.tls_key = Some(cert);
        let err = server_config(&config).unwrap_err().to_string();
        assert!(
            err.contains("smtp.tls_key") && err.contains("no PRIVATE KEY block"),
            "{err}"
        );
    }

    #[test]
    fn names_the_file_when_pem_is_bad() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, "not pem").unwrap();
        std::fs::write(&key, "not pem").unwrap();
        let mut config = config_in(dir.path());
        config.smtp.tls_cert = Some(cert);
        config.smtp.tls_key = Some(key);
        let err = server_config(&config).unwrap_err().to_string();
        assert!(err.contains("c.pem"), "{err}");
    }
}
