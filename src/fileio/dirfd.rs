//! Directory handles for everything `generate` does under its secrets directory, so that
//! no planted symbolic link (a cloned repository can carry them anywhere) is ever followed.
//!
//! Each directory is opened once with `O_DIRECTORY|O_NOFOLLOW` and every later operation
//! (open, create, stat, chmod, rename, unlink) is relative to that descriptor and again
//! refuses to follow a link, and the checks (regular file, directory, size) are made on the
//! opened descriptor (`fstat`), never on a path looked at earlier. A link or special file
//! where a key file, `keys/`, `backups/` or a backup belongs is refused with a message that
//! names the path and the problem, so its target is never read, chmod'ed or removed.
//! Paths given on the command line are the operator's choice: their leading components are
//! followed as usual, but the directory they name (`--dir`) must not itself be a link.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, RenameFlags, openat, renameat, renameat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, fsync, unlinkat};
use zeroize::Zeroizing;

use crate::error::Failure;

/// What a directory entry is, looked at without following a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Missing,
    File,
    Dir,
    Symlink,
    Other,
}

impl Kind {
    /// The kind of what `stat` describes.
    pub fn of(stat: &FileStat) -> Kind {
        match SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFREG => Kind::File,
            SFlag::S_IFDIR => Kind::Dir,
            SFlag::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        }
    }

    /// The problem with an entry that should have been a regular file or a directory.
    pub fn problem(self) -> &'static str {
        match self {
            Kind::Missing => "does not exist",
            Kind::File => "is a file, not a directory",
            Kind::Dir => "is a directory, not a file",
            Kind::Symlink => {
                "is a symbolic link, which is not followed here (put the file or directory \
                 itself there, or name its real path)"
            }
            Kind::Other => "is not a regular file (a FIFO, socket or device)",
        }
    }
}

/// An open directory: the descriptor every operation goes through, and its path for messages.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// Flags of every open: never a controlling terminal, never inherited by a child.
fn base_flags() -> OFlag {
    OFlag::O_CLOEXEC | OFlag::O_NOCTTY
}

/// `path` as a `Path`, `.` when empty (the parent of a bare file name).
fn or_dot(path: &Path) -> &Path {
    if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    }
}

impl Dir {
    /// A directory its caller opened itself (without following a link) and judged by rules
    /// of its own, such as the state directory's owner and mode; `path` is for messages.
    pub fn from_checked(fd: OwnedFd, path: PathBuf) -> Dir {
        Dir { fd, path }
    }

    /// Opens the directory `path` names; `None` if it does not exist. Its last component
    /// must be a directory, not a link to one.
    pub fn open_path(path: &Path) -> anyhow::Result<Option<Dir>> {
        let Some((parent, name)) = split(path) else {
            // `.`, `..` or `/`: no entry of its own that could be a link.
            return match open_dir_fd(path) {
                Ok(fd) => Ok(Some(Dir {
                    fd,
                    path: path.to_owned(),
                })),
                Err(Errno::ENOENT) => Ok(None),
                Err(err) => {
                    Err(err).with_context(|| format!("opening directory {}", path.display()))
                }
            };
        };
        let parent = match open_dir_fd(parent) {
            Ok(fd) => Dir {
                fd,
                path: parent.to_owned(),
            },
            Err(Errno::ENOENT) => return Ok(None),
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("opening directory {}", or_dot(parent).display()));
            }
        };
        let dir = parent.dir(name)?;
        Ok(dir.map(|fd| Dir {
            fd,
            path: path.to_owned(),
        }))
    }

    /// Opens an operator-named directory, following links in its path (the `--output`
    /// directory, a backup named by its path).
    pub fn open_followed(path: &Path) -> anyhow::Result<Dir> {
        let path = or_dot(path);
        let fd =
            open_dir_fd(path).with_context(|| format!("opening directory {}", path.display()))?;
        Ok(Dir {
            fd,
            path: path.to_owned(),
        })
    }

    /// Creates the directory `path` names (and its missing parents) with mode 0700 if it
    /// does not exist, and opens it; an existing one keeps its mode.
    pub fn create_path(path: &Path, mode: u32) -> anyhow::Result<Dir> {
        if let Some(dir) = Dir::open_path(path)? {
            return Ok(dir);
        }
        let Some((parent, name)) = split(path) else {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(path)
                .with_context(|| format!("creating directory {}", path.display()))?;
            return Dir::open_followed(path);
        };
        // Missing parents are private too (with umask 000 they would be world-writable,
        // letting anyone swap the secrets directory).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(or_dot(parent))
            .with_context(|| format!("creating directory {}", or_dot(parent).display()))?;
        let parent = Dir::open_followed(parent)?;
        Ok(Dir {
            fd: parent.private_dir_fd(name, mode)?,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path/name` for messages.
    pub fn shown(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }

    /// A second descriptor for the same open directory (for the `flock`, which belongs to
    /// the open file description both share).
    pub fn try_clone_fd(&self) -> anyhow::Result<OwnedFd> {
        self.fd
            .try_clone()
            .with_context(|| format!("duplicating the handle of {}", self.path.display()))
    }

    /// What `name` is, without following a link.
    pub fn kind(&self, name: &str) -> anyhow::Result<Kind> {
        Ok(self.stat(name)?.as_ref().map_or(Kind::Missing, Kind::of))
    }

    /// `lstat` of `name` relative to this directory; `None` if missing.
    pub fn stat(&self, name: &str) -> anyhow::Result<Option<FileStat>> {
        match fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(stat)),
            Err(Errno::ENOENT) => Ok(None),
            Err(err) => Err(err).with_context(|| format!("inspecting {}", self.shown(name))),
        }
    }

    /// Refuses `name` unless it is missing or of kind `want`.
    fn expect(&self, name: &str, want: Kind) -> anyhow::Result<()> {
        match self.kind(name)? {
            Kind::Missing => Ok(()),
            kind if kind == want => Ok(()),
            kind => Err(refused(format!("{} {}", self.shown(name), kind.problem()))),
        }
    }

    /// Opens the subdirectory `name`; `None` if missing; a link or a non-directory is refused.
    fn dir(&self, name: &str) -> anyhow::Result<Option<OwnedFd>> {
        let flags = base_flags() | OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW;
        match openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::ENOENT) => Ok(None),
            // A link (ELOOP) or a file (ENOTDIR): say which, from what is there.
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                self.expect(name, Kind::Dir)?;
                anyhow::bail!("{} changed while being opened", self.shown(name))
            }
            Err(err) => Err(err).with_context(|| format!("opening {}", self.shown(name))),
        }
    }

    /// The subdirectory `name` if it exists (never a link).
    pub fn subdir(&self, name: &str) -> anyhow::Result<Option<Dir>> {
        Ok(self.dir(name)?.map(|fd| Dir {
            fd,
            path: self.path.join(name),
        }))
    }

    /// The subdirectory `name`, created with `mode` if missing and set to `mode` if it
    /// differs (on the opened descriptor, so never on a link's target).
    pub fn private_subdir(&self, name: &str, mode: u32) -> anyhow::Result<Dir> {
        Ok(Dir {
            fd: self.private_dir_fd(name, mode)?,
            path: self.path.join(name),
        })
    }

    fn private_dir_fd(&self, name: &str, mode: u32) -> anyhow::Result<OwnedFd> {
        let shown = self.shown(name);
        let created = match mkdirat(&self.fd, name, Mode::from_bits_truncate(mode)) {
            Ok(()) => true,
            Err(Errno::EEXIST) => false,
            Err(err) => return Err(err).with_context(|| format!("creating directory {shown}")),
        };
        let fd = self
            .dir(name)?
            .with_context(|| format!("{shown} disappeared while being created"))?;
        let stat = fstat(&fd).with_context(|| format!("inspecting {shown}"))?;
        // The umask may have removed bits of a new one; an old one is tightened.
        if stat.st_mode & 0o7777 != mode {
            fchmod(&fd, Mode::from_bits_truncate(mode))
                .with_context(|| format!("setting mode {mode:04o} on {shown}"))?;
        }
        if created {
            // Make the new directory entry itself durable.
            self.sync()?;
        }
        Ok(fd)
    }

    /// Opens the regular file `name` for reading: without following a link, without
    /// blocking (a FIFO would block `open` until a writer came), and checked on the
    /// descriptor; `None` if missing. A file with more than one name is refused too: a hard
    /// link is a link (where `fs.protected_hardlinks` is 0, anyone who can write here can
    /// give any file of the filesystem a name here), and reading it into a manifest or
    /// changing its mode would reach that other file. Nothing of ours makes hard links.
    pub fn open_file(&self, name: &str) -> anyhow::Result<Option<(File, FileStat)>> {
        let flags = base_flags() | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK;
        match openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => {
                let shown = self.shown(name);
                let (file, stat) = checked_file(fd, &shown)?;
                if stat.st_nlink > 1 {
                    return Err(refused(format!(
                        "{shown} has {} names (hard links), which `generate` does not read or \
                         change (replace it by a copy of its own: cp, then mv over it)",
                        stat.st_nlink
                    )));
                }
                Ok(Some((file, stat)))
            }
            Err(Errno::ENOENT) => Ok(None),
            Err(Errno::ELOOP) => Err(refused(format!(
                "{} {}",
                self.shown(name),
                Kind::Symlink.problem()
            ))),
            Err(err) => Err(err).with_context(|| format!("opening {}", self.shown(name))),
        }
    }

    /// Reads the regular file `name` (at most `max` bytes, else refused); `None` if missing.
    pub fn read_file(&self, name: &str, max: usize) -> anyhow::Result<Option<Zeroizing<Vec<u8>>>> {
        match self.open_file(name)? {
            Some((file, stat)) => read_bounded(file, &stat, max, &self.shown(name)).map(Some),
            None => Ok(None),
        }
    }

    /// Sets the mode of the regular file `name` to `mode` if it differs; returns whether
    /// it did. The file is opened without following a link and changed by descriptor.
    pub fn fix_mode(&self, name: &str, mode: u32) -> anyhow::Result<bool> {
        let shown = self.shown(name);
        let (file, stat) = self
            .open_file(name)?
            .with_context(|| format!("{shown} disappeared"))?;
        if stat.st_mode & 0o7777 == mode {
            return Ok(false);
        }
        fchmod(&file, Mode::from_bits_truncate(mode))
            .with_context(|| format!("setting mode {mode:04o} on {shown}"))?;
        Ok(true)
    }

    /// Creates the new file `name` (never an existing one or through a link) with `mode`,
    /// writes `contents` and fsyncs it.
    pub fn create_synced(
        &self,
        name: &str,
        mode: u32,
        contents: &[u8],
        between_steps: impl Fn(),
    ) -> anyhow::Result<()> {
        let shown = self.shown(name);
        let flags =
            base_flags() | OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW;
        let fd = openat(&self.fd, name, flags, Mode::from_bits_truncate(mode))
            .with_context(|| format!("creating {shown}"))?;
        // `mode` above is filtered by the umask; make it exact.
        fchmod(&fd, Mode::from_bits_truncate(mode))
            .with_context(|| format!("setting mode {mode:04o} on {shown}"))?;
        let mut file = File::from(fd);
        file.write_all(contents)
            .with_context(|| format!("writing {shown}"))?;
        between_steps();
        // The data must be on disk before any name can point at it.
        file.sync_all().with_context(|| format!("syncing {shown}"))
    }

    /// Renames `from` to `to` within this directory, replacing `to` (a link there is
    /// replaced, not followed).
    pub fn rename(&self, from: &str, to: &str) -> anyhow::Result<()> {
        renameat(&self.fd, from, &self.fd, to)
            .with_context(|| format!("renaming into {}", self.shown(to)))
    }

    /// Renames `from` to `to` within this directory unless `to` exists; returns whether
    /// it did.
    pub fn rename_new(&self, from: &str, to: &str) -> anyhow::Result<bool> {
        match renameat2(&self.fd, from, &self.fd, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => Ok(true),
            Err(Errno::EEXIST) => Ok(false),
            Err(err) => Err(err).with_context(|| format!("renaming into {}", self.shown(to))),
        }
    }

    /// Removes the file (or link) `name`; a missing one is fine.
    pub fn remove_file(&self, name: &str) -> anyhow::Result<()> {
        match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(err) => Err(err).with_context(|| format!("removing {}", self.shown(name))),
        }
    }

    /// Removes `name` and, if it is a real directory, everything under it; links are
    /// removed themselves and never followed.
    pub fn remove_tree(&self, name: &str) -> anyhow::Result<()> {
        self.remove_tree_below(name, 0)
    }

    /// `remove_tree` at `depth` levels below its start. Ours are two levels deep (a backup,
    /// its `keys/`, the files); a planted tree much deeper is refused rather than recursed.
    fn remove_tree_below(&self, name: &str, depth: usize) -> anyhow::Result<()> {
        const MAX_DEPTH: usize = 8;
        if self.kind(name)? != Kind::Dir {
            return self.remove_file(name);
        }
        if depth >= MAX_DEPTH {
            return Err(refused(format!(
                "{} is nested deeper than any directory of ours: remove it by hand",
                self.shown(name)
            )));
        }
        let Some(sub) = self.subdir(name)? else {
            return Ok(());
        };
        for (entry, _) in sub.entries()? {
            sub.remove_tree_below(&entry, depth + 1)?;
        }
        unlinkat(&self.fd, name, UnlinkatFlags::RemoveDir)
            .with_context(|| format!("removing {}", self.shown(name)))
    }

    /// The entries of this directory (without `.` and `..`), with their kinds. Names that
    /// are not UTF-8 are skipped: none of ours is.
    pub fn entries(&self) -> anyhow::Result<Vec<(String, Kind)>> {
        let fd = openat(
            &self.fd,
            ".",
            base_flags() | OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .with_context(|| format!("listing {}", self.path.display()))?;
        let mut dir = nix::dir::Dir::from_fd(fd)
            .with_context(|| format!("listing {}", self.path.display()))?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry.with_context(|| format!("listing {}", self.path.display()))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            let Some(name) = name.to_str() else { continue };
            if name == "." || name == ".." {
                continue;
            }
            names.push(name.to_owned());
        }
        names
            .into_iter()
            .map(|name| {
                let kind = self.kind(&name)?;
                Ok((name, kind))
            })
            .collect()
    }

    /// Fsyncs the directory, making the creations, renames and removals in it durable.
    pub fn sync(&self) -> anyhow::Result<()> {
        fsync(&self.fd).with_context(|| format!("syncing directory {}", self.path.display()))
    }

    /// Refuses unless the effective user may create files here (checked up front, so a
    /// write that would fail is refused before anything else is written).
    pub fn check_writable(&self) -> anyhow::Result<()> {
        use nix::unistd::{AccessFlags, faccessat};
        faccessat(
            &self.fd,
            ".",
            AccessFlags::W_OK | AccessFlags::X_OK,
            AtFlags::AT_EACCESS,
        )
        .with_context(|| format!("{} is not writable", self.path.display()))
    }
}

/// Opens an operator-named directory, following links in its path.
fn open_dir_fd(path: &Path) -> nix::Result<OwnedFd> {
    let flags = base_flags() | OFlag::O_RDONLY | OFlag::O_DIRECTORY;
    openat(AT_FDCWD, or_dot(path), flags, Mode::empty())
}

/// A refusal of bad input: a configuration error (exit 3) naming the path and the problem.
fn refused(text: String) -> anyhow::Error {
    anyhow::anyhow!(text).context(Failure::Config)
}

/// Splits a command-line path into its parent and last component (`--dir infra/secrets`:
/// `infra`, `secrets`); `None` for a path ending in `.`, `..` or `/` alone, whose last
/// component is no entry of its own.
fn split(path: &Path) -> Option<(&Path, &str)> {
    let name = path.file_name()?.to_str()?;
    Some((path.parent().unwrap_or(Path::new("")), name))
}

/// Opens an operator-named file for reading (following links in its path, as the operator
/// chose it) without blocking, checked on the descriptor to be a regular file.
pub fn open_followed_file(path: &Path) -> anyhow::Result<(File, FileStat)> {
    let flags = base_flags() | OFlag::O_RDONLY | OFlag::O_NONBLOCK;
    let fd = openat(AT_FDCWD, path, flags, Mode::empty())
        .with_context(|| format!("opening {}", path.display()))?;
    checked_file(fd, &path.display().to_string())
}

/// Reads an operator-named regular file of at most `max` bytes.
pub fn read_followed_file(path: &Path, max: usize) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let (file, stat) = open_followed_file(path)?;
    read_bounded(file, &stat, max, &path.display().to_string())
}

/// Checks on the descriptor (not on a path looked at earlier) that what was opened is a
/// regular file.
fn checked_file(fd: OwnedFd, shown: &str) -> anyhow::Result<(File, FileStat)> {
    let stat = fstat(&fd).with_context(|| format!("inspecting {shown}"))?;
    let kind = Kind::of(&stat);
    if kind != Kind::File {
        return Err(refused(format!("{shown} {}", kind.problem())));
    }
    Ok((File::from(fd), stat))
}

/// Reads an opened regular file: refused if its size is over `max` before a byte is read,
/// and at most `max + 1` bytes are read whatever the file does meanwhile. The buffer is
/// allocated once, so no reallocation leaves an un-zeroized copy behind.
fn read_bounded(
    file: File,
    stat: &FileStat,
    max: usize,
    shown: &str,
) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let size = u64::try_from(stat.st_size).unwrap_or(0);
    if size > max as u64 {
        return Err(refused(format!("{shown} is larger than {max} bytes")));
    }
    // Cannot truncate: `size <= max`, a usize.
    let mut bytes = Zeroizing::new(vec![0u8; size as usize + 1]);
    let mut filled = 0;
    let mut file = file.take(max as u64 + 1);
    loop {
        if filled == bytes.len() {
            if bytes.len() > max {
                return Err(refused(format!("{shown} is larger than {max} bytes")));
            }
            // The file grew while being read: one more exact-size buffer, the old zeroized.
            let mut bigger = Zeroizing::new(vec![0u8; max + 1]);
            bigger[..filled].copy_from_slice(&bytes[..filled]);
            bytes = bigger;
        }
        match file.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err).with_context(|| format!("reading {shown}")),
        }
    }
    if filled > max {
        return Err(refused(format!("{shown} is larger than {max} bytes")));
    }
    // Shortening keeps the allocation; the whole of it is zeroized on drop.
    bytes.truncate(filled);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    #[test]
    fn links_are_refused_and_their_targets_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::create_path(&tmp.path().join("s"), 0o700).unwrap();
        let target = tmp.path().join("target");
        std::fs::write(&target, "outside").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        symlink(&target, tmp.path().join("s/link")).unwrap();
        symlink(tmp.path(), tmp.path().join("s/dirlink")).unwrap();
        assert_eq!(root.kind("link").unwrap(), Kind::Symlink);
        for err in [
            root.read_file("link", 100).unwrap_err(),
            root.fix_mode("link", 0o600).unwrap_err(),
            root.subdir("dirlink").unwrap_err(),
            root.private_subdir("dirlink", 0o700).unwrap_err(),
        ] {
            let text = format!("{err:#}");
            assert!(text.contains("symbolic link"), "{text}");
            assert!(!text.contains("outside"), "{text}");
        }
        assert_eq!(
            std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
            0o644
        );
        root.remove_tree("dirlink").unwrap();
        assert!(tmp.path().join("target").exists());
        let err = Dir::open_path(&tmp.path().join("s/link")).unwrap_err();
        assert!(format!("{err:#}").contains("symbolic link"));
    }

    #[test]
    fn reads_are_bounded_and_special_files_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::create_path(&tmp.path().join("s"), 0o700).unwrap();
        root.create_synced("f", 0o600, b"12345", || {}).unwrap();
        assert_eq!(&**root.read_file("f", 5).unwrap().unwrap(), b"12345");
        let err = format!("{:#}", root.read_file("f", 4).unwrap_err());
        assert!(err.contains("larger than 4 bytes"), "{err}");
        assert!(root.read_file("missing", 4).unwrap().is_none());
        let err = format!(
            "{:#}",
            read_followed_file(Path::new("/dev/zero"), 10).unwrap_err()
        );
        assert!(err.contains("not a regular file"), "{err}");
        std::fs::hard_link(tmp.path().join("s/f"), tmp.path().join("s/g")).unwrap();
        let err = format!("{:#}", root.read_file("g", 10).unwrap_err());
        assert!(err.contains("hard links"), "{err}");
        nix::unistd::mkfifo(&tmp.path().join("s/fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        let err = format!("{:#}", root.read_file("fifo", 10).unwrap_err());
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn remove_tree_and_rename_new() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::create_path(&tmp.path().join("s"), 0o700).unwrap();
        let sub = root.private_subdir("a", 0o700).unwrap();
        let deeper = sub.private_subdir("keys", 0o700).unwrap();
        deeper.create_synced("x", 0o600, b"x", || {}).unwrap();
        assert!(root.rename_new("a", "b").unwrap());
        root.private_subdir("c", 0o700).unwrap();
        root.subdir("c")
            .unwrap()
            .unwrap()
            .create_synced("y", 0o600, b"", || {})
            .unwrap();
        assert!(!root.rename_new("b", "c").unwrap());
        root.remove_tree("b").unwrap();
        let names: Vec<String> = root
            .entries()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["c"]);
    }

    #[test]
    fn dot_dirs_open_and_planted_deep_trees_are_refused() {
        assert!(Dir::open_path(Path::new(".")).unwrap().is_some());
        assert!(Dir::open_path(Path::new("/")).unwrap().is_some());
        let tmp = tempfile::tempdir().unwrap();
        assert!(Dir::open_path(&tmp.path().join("a/b")).unwrap().is_none());
        let root = Dir::create_path(&tmp.path().join("s"), 0o700).unwrap();
        std::fs::create_dir_all(tmp.path().join("s/deep").join("d/".repeat(12))).unwrap();
        let err = format!("{:#}", root.remove_tree("deep").unwrap_err());
        assert!(err.contains("nested deeper"), "{err}");
    }
}
