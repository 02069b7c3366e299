//! A small filesystem for full-disk tests: a tmpfs mounted over a test's data directory.

/// A tmpfs mounted at a path for the length of a test; detached lazily on drop (the server
/// may still hold files open while the test's other values drop).
pub struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// `None` when not root: mounting needs it (CI runs the tests as root).
    pub fn mount(path: &std::path::Path, size: &str) -> Option<Self> {
        let uid = std::process::Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            eprintln!("skipping: mounting a small filesystem needs root");
            return None;
        }
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(SmallDisk(path.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes a file until the filesystem is full, to the last page (smaller writes at the end:
/// not even one more page of a database's log fits).
pub fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    for size in [64 * 1024, 4096, 512, 1] {
        let chunk = vec![b'f'; size];
        while f.write_all(&chunk).is_ok() {}
    }
    let _ = f.sync_all();
}
