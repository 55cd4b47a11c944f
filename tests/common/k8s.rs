//! A simulation of Kubernetes' AtomicWriter (how the kubelet updates a Secret volume), so
//! the watch tests see exactly the filesystem operations a real rotation produces.
//!
//! The kubelet writes the new payload into a fresh `..<timestamp>` directory, points a
//! `..data_tmp` symlink at it and renames that over `..data` (the one atomic step), makes
//! sure every visible name is a symlink through `..data`, then deletes the old timestamped
//! directory and visible names no longer in the payload. The visible files' own inodes are
//! never rewritten: an inotify watch on one of them watches the old inode, which the
//! first swap unlinks, so such a watch sees no later update.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

/// A projected Secret volume at `dir`.
pub struct SecretVolume {
    pub dir: PathBuf,
    swaps: u32,
}

impl SecretVolume {
    /// An empty volume directory (created, 0755 like the kubelet's).
    pub fn new(dir: &Path) -> SecretVolume {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        SecretVolume {
            dir: dir.to_path_buf(),
            swaps: 0,
        }
    }

    /// One AtomicWriter update with the full payload `files` (name, content).
    pub fn update(&mut self, files: &[(&str, &[u8])]) {
        self.swaps += 1;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let ts_name = format!("..2026_01_01_00_00_00.{nanos}-{}", self.swaps);
        let ts_dir = self.dir.join(&ts_name);
        std::fs::create_dir(&ts_dir).unwrap();
        for (name, content) in files {
            let path = ts_dir.join(name);
            std::fs::write(&path, content).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let old_target = std::fs::read_link(self.dir.join("..data")).ok();
        let tmp = self.dir.join("..data_tmp");
        symlink(&ts_name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        for (name, _) in files {
            let visible = self.dir.join(name);
            if std::fs::symlink_metadata(&visible).is_err() {
                symlink(Path::new("..data").join(name), &visible).unwrap();
            }
        }
        if let Some(old) = old_target {
            let old_dir = self.dir.join(&old);
            // Visible names no longer in the payload go first, then the old data.
            if let Ok(entries) = std::fs::read_dir(&old_dir) {
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    if !files.iter().any(|(n, _)| name == std::ffi::OsStr::new(n)) {
                        let _ = std::fs::remove_file(self.dir.join(&name));
                    }
                }
            }
            std::fs::remove_dir_all(old_dir).unwrap();
        }
    }
}
