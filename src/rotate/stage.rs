//! Stages 2, 3 and 5 of a rotation and its undo: the complete backup, the staged values
//! with the record that lets a killed run be aborted, the byte-for-byte rollback, and the
//! publish (one atomic rewrite of `pg_service.conf`). Every file is written through the
//! handles of `generate`'s lock (atomic, durable, never through a link), and the complete
//! backup is durable before the first staged file is replaced.

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::set::RoleSet;
use crate::error::Failure;
use crate::overlap::files::{self, PENDING_FILE};
use crate::overlap::{SERVICE_FILE, service_file};
use crate::secret::Secret;
use crate::store::{self, Dir, Locked};

/// A login staged with a new password.
pub(super) struct Staged {
    pub(super) role: String,
    pub(super) login: String,
    pub(super) file: String,
    pub(super) password: Secret,
}

/// The record of a stage: enough to finish or undo it, and no value.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Pending {
    /// Backup directory name under `backups/`.
    backup: String,
    /// Files in `keys/` the stage wrote (restored from the backup on rollback).
    files: Vec<String>,
    /// Files the stage created (removed on rollback).
    created: Vec<String>,
    /// (role, staged login, its file).
    logins: Vec<(String, String, String)>,
    /// Each file the stage wrote, as it was right after: a rollback never restores a file
    /// that changed since (someone else wrote it, and their value would be lost).
    #[serde(default)]
    written: Vec<(String, FileId)>,
}

/// Which version of a file this is: an atomic write makes a new inode, and an in-place
/// write changes the modification time or size. No value, nothing derived from one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct FileId {
    inode: u64,
    size: i64,
    mtime: i64,
    mtime_nsec: i64,
}

impl FileId {
    /// The version of `dir/name` now (`None`: no file there).
    fn of(dir: &Dir, name: &str) -> anyhow::Result<Option<FileId>> {
        Ok(dir.stat(name)?.map(|st| FileId {
            inode: st.st_ino,
            size: st.st_size,
            mtime: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec,
        }))
    }
}

impl Pending {
    fn write(&self, root: &Dir) -> anyhow::Result<()> {
        let record = serde_json::to_vec_pretty(self).context("writing the rotation record")?;
        store::write(root, PENDING_FILE, &record)
    }

    /// Refuses a rollback when a file the stage wrote has changed since (nothing is
    /// restored then): restoring it would throw away someone else's newer value, a
    /// `generate --force` after a leak, say. A file that holds its pre-stage bytes again
    /// loses nothing by the restore.
    fn check_unchanged(&self, keys: &Dir, backup_keys: &Dir) -> anyhow::Result<()> {
        let mut changed = Vec::new();
        for (file, id) in &self.written {
            if FileId::of(keys, file)? == Some(*id) {
                continue;
            }
            let back_to_before = !self.created.contains(file)
                && keys.read_file(file, store::MAX_FILE_BYTES)?.as_deref()
                    == Some(&*self.before_stage(backup_keys, file)?);
            if !back_to_before {
                changed.push(keys.shown(file));
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        Err(anyhow::anyhow!(
            "{} changed since the stage (written by someone else): not rolling back, so as \
             not to undo a newer value; nothing was restored. Check them, then restore what \
             should be from backups/{} (`generate --restore`) and remove {PENDING_FILE}",
            changed.join(", "),
            self.backup
        ))
        .context(Failure::Config)
    }

    pub(super) fn read(root: &Dir) -> anyhow::Result<Pending> {
        let shown = root.shown(PENDING_FILE);
        let bytes = store::read_exact(root, PENDING_FILE)
            .with_context(|| format!("no staged rotation to finish ({shown})"))
            .context(Failure::Config)?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{shown} is not a rotation record"))
            .context(Failure::Config)
    }

    /// Whether a record is there (anything at its name counts: it is never followed).
    pub(super) fn exists(root: &Dir) -> anyhow::Result<bool> {
        Ok(root.stat(PENDING_FILE)?.is_some())
    }

    /// Whether `pg_service.conf` already publishes every staged login: the run that
    /// published was killed (or failed) before it removed the record. Only the publish
    /// writes `pg_service.conf`, in one rename, so it names all of the staged logins or
    /// none of them; anything else is not a state a rotation leaves, and is refused. A
    /// missing file, or one that does not parse, was not written by the publish: not
    /// published. A file that cannot be read is an error: guessing "not published" would
    /// roll the published login's file back under it.
    pub(super) fn already_published(&self, keys: &Dir) -> anyhow::Result<bool> {
        let Some(bytes) = keys
            .read_file(SERVICE_FILE, crate::overlap::MAX_SERVICE_FILE_BYTES)
            .context(Failure::Config)?
        else {
            return Ok(false);
        };
        let Some(service) = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| service_file::parse(text).ok())
        else {
            return Ok(false);
        };
        let named = self
            .logins
            .iter()
            .filter(|(role, login, _)| {
                service.get(role).and_then(|s| s.user.as_deref()) == Some(login.as_str())
            })
            .count();
        match named {
            0 => Ok(false),
            n if n == self.logins.len() => Ok(true),
            _ => Err(anyhow::anyhow!(
                "{} publishes some of the staged logins but not all: not a state a rotation \
                 leaves; restore a backup with `generate --restore`, then `rotate --abort`",
                keys.shown(SERVICE_FILE)
            ))
            .context(Failure::Config),
        }
    }

    /// The bytes `file` held before the stage, from its backup (`backup_keys`, the
    /// backup's `keys/`).
    fn before_stage(&self, backup_keys: &Dir, file: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        store::read_exact(backup_keys, file)
            .with_context(|| format!("reading {file} from backup {}", self.backup))
    }

    /// Refuses to publish a stage that did not finish (`--publish-only` after a run killed
    /// while staging): a staged login whose file still holds its value from before the
    /// rotation (byte for byte the backup's) was never given its new password, and still
    /// has the old one the server let expire; publishing it would hand applications a
    /// login that fails until the next sync.
    pub(super) fn check_staged(&self, locked: &Locked) -> anyhow::Result<()> {
        let keys = &locked.keys;
        let backup_keys = locked
            .backup_keys(&self.backup)
            .with_context(|| {
                format!(
                    "checking that the stage finished needs backups/{} (removed by \
                     `generate --keep-backups`?): restore it, or check the staged logins \
                     with `verify --overlap --staged` and remove {PENDING_FILE} by hand",
                    self.backup
                )
            })
            .context(Failure::Config)?;
        for (_, login, file) in &self.logins {
            if self.created.contains(file) {
                // Absent before the stage: the file there now is the stage's.
                continue;
            }
            let before = self.before_stage(&backup_keys, file)?;
            let now = store::read_exact(keys, file)?;
            if *before == *now {
                return Err(anyhow::anyhow!(
                    "the stage did not finish: {} (login {login:?}) still holds its password \
                     from before the rotation (backups/{}); run `rotate --abort`, then \
                     rotate again",
                    keys.shown(file),
                    self.backup
                ))
                .context(Failure::Config);
            }
        }
        Ok(())
    }

    /// The staged logins with the passwords their files hold now (`--publish-only`).
    pub(super) fn staged_from_files(&self, set: &RoleSet) -> anyhow::Result<Vec<Staged>> {
        self.logins
            .iter()
            .map(|(role, login, file)| {
                let known = set.roles.iter().any(|r| {
                    r.pair.role == *role && r.unpublished() == (login.as_str(), file.as_str())
                });
                if !known {
                    bail!(
                        "the staged login {login:?} of role {role:?} is no longer the \
                         unpublished one; `rotate --abort` and start again"
                    );
                }
                Ok(Staged {
                    role: role.clone(),
                    login: login.clone(),
                    file: file.clone(),
                    password: match set.roles.iter().find(|r| r.pair.role == *role) {
                        Some(r) => r.password(r.pair.published.other()).clone(),
                        None => bail!("role {role:?} is no longer configured"),
                    },
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .context(Failure::Config)
    }
}

/// Stages 2 and 3: complete backup, the record, then the new values (atomic writes).
pub(super) fn stage(
    locked: &mut Locked,
    set: &RoleSet,
    suffix: &str,
) -> anyhow::Result<(Pending, Vec<Staged>)> {
    // The superuser, redis, session and CSRF secrets (and any other catalog password that
    // is not an overlapped pair's): single-login secrets, rotated as `generate --force`
    // does; a superuser file outside the catalog is left alone. Written first: every read
    // of the set that sees a staged login's new file sees them too, so once the staged
    // logins log in, the sync that applied them has applied the superuser's new password
    // in the same transaction, and the next `rotate`, which logs in with it, finds it in
    // force.
    let mut untouched = set.files();
    untouched.extend(set.left_alone.iter().cloned());
    let mut writes: Vec<(String, Secret)> = files::single_login_values(&untouched)?;
    let mut staged = Vec::new();
    for role in &set.roles {
        let (login, file) = role.unpublished();
        let password = crate::store::random::password()?;
        staged.push(Staged {
            role: role.pair.role.clone(),
            login: login.to_owned(),
            file: file.to_owned(),
            password: password.clone(),
        });
        writes.push((file.to_owned(), password));
    }
    // The publish's rendering, checked before the first write (then thrown away).
    published_text(set, &staged)?;

    // Refuses a link among the set's files before anything is written.
    let mut present = files::present_files(&locked.keys, suffix)?;
    for file in set.files() {
        if !present.contains(&file) {
            present.push(file);
        }
    }
    let names: Vec<&str> = present.iter().map(String::as_str).collect();
    let backup = locked.backup(&names)?.name;
    println!("backed up {} files to backups/{backup}", present.len());
    let mut pending = Pending {
        backup,
        files: writes.iter().map(|(f, _)| f.clone()).collect(),
        created: writes
            .iter()
            .map(|(f, _)| f.clone())
            .filter(|f| !present.contains(f))
            .collect(),
        logins: staged
            .iter()
            .map(|s| (s.role.clone(), s.login.clone(), s.file.clone()))
            .collect(),
        written: Vec::new(),
    };
    // First the record (a run killed from here on can be aborted), then the values, then
    // the record again with the versions the stage wrote.
    pending.write(&locked.root)?;
    for (file, value) in &writes {
        store::write(&locked.keys, file, value.expose().as_bytes())?;
        if let Some(id) = FileId::of(&locked.keys, file)? {
            pending.written.push((file.clone(), id));
        }
    }
    pending.write(&locked.root)?;
    for s in &staged {
        println!(
            "staged a new password for login {:?} (role {:?}) in keys/{}",
            s.login, s.role, s.file
        );
    }
    let singles: Vec<&str> = writes
        .iter()
        .skip(staged.len())
        .map(|(f, _)| f.as_str())
        .collect();
    println!("regenerated {}", singles.join(", "));
    Ok((pending, staged))
}

/// Puts every staged file back from the stage's backup, byte for byte, removes the files
/// the stage created and the record. `pg_service.conf` was never written by the stage.
pub(super) fn rollback(locked: &Locked, pending: &Pending) -> anyhow::Result<()> {
    let keys = &locked.keys;
    let backup_keys = locked.backup_keys(&pending.backup)?;
    pending.check_unchanged(keys, &backup_keys)?;
    let mut restored = 0;
    for file in &pending.files {
        if pending.created.contains(file) {
            keys.remove_file(file)?;
            continue;
        }
        let bytes = pending.before_stage(&backup_keys, file)?;
        store::write(keys, file, &bytes)?;
        restored += 1;
    }
    keys.sync()?;
    remove_pending(&locked.root)?;
    println!(
        "rolled back: restored {restored} staged files from backups/{} byte for byte; the \
         published credentials were not changed",
        pending.backup
    );
    Ok(())
}

/// Ends a stage that was already published (`Pending::already_published`): the rotation
/// is complete, so only the record goes. Undoing it instead would restore the published
/// login's file but not `pg_service.conf` (which the stage never wrote), a set the sync
/// refuses; and restoring both would take back a credential applications may already
/// hold, which the server would stop accepting.
pub(super) fn finish_published(root: &Dir, pending: &Pending) -> anyhow::Result<()> {
    remove_pending(root)?;
    for (role, login, _) in &pending.logins {
        println!(
            "login {login:?} of role {role:?} was already published (the run ended before \
             removing {PENDING_FILE}); nothing to undo"
        );
    }
    println!(
        "the rotation is complete; removed {}",
        root.shown(PENDING_FILE)
    );
    Ok(())
}

pub(super) fn remove_pending(root: &Dir) -> anyhow::Result<()> {
    root.remove_file(PENDING_FILE)?;
    root.sync()
}

/// The text of `pg_service.conf` publishing the staged logins, other sections and
/// settings kept. `stage` renders it once before its first write, so that a file the
/// writer refuses (a line older libpq cannot read) is refused before anything changes.
fn published_text(set: &RoleSet, staged: &[Staged]) -> anyhow::Result<Zeroizing<String>> {
    let mut service = set.service.clone();
    for s in staged {
        service.publish(&s.role, &s.login, s.password.clone());
    }
    service_file::render(&service)
        .with_context(|| format!("publishing the staged logins in keys/{SERVICE_FILE}"))
        .context(Failure::Config)
}

/// Stage 5: one atomic rewrite of `pg_service.conf`, other sections and settings kept.
pub(super) fn publish(keys: &Dir, set: &RoleSet, staged: &[Staged]) -> anyhow::Result<()> {
    let text = published_text(set, staged)?;
    store::write(keys, SERVICE_FILE, text.as_bytes())?;
    for s in staged {
        println!(
            "published login {:?} for role {:?} in keys/{SERVICE_FILE}",
            s.login, s.role
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> Pending {
        Pending {
            backup: "backup-20250101-000000".into(),
            files: vec!["a_alt.txt".into(), "b_alt.txt".into()],
            created: Vec::new(),
            logins: vec![
                ("a".into(), "a_alt".into(), "a_alt.txt".into()),
                ("b".into(), "b_alt".into(), "b_alt.txt".into()),
            ],
            written: Vec::new(),
        }
    }

    #[test]
    fn a_stage_counts_as_published_only_when_every_staged_login_is() {
        let tmp = tempfile::tempdir().unwrap();
        let keys = Dir::open_path(tmp.path()).unwrap().unwrap();
        let service = |a: &str, b: &str| {
            let text = format!("[a]\nuser={a}\npassword=p\n\n[b]\nuser={b}\npassword=q\n");
            std::fs::write(tmp.path().join(SERVICE_FILE), text).unwrap();
        };
        // No file, or one the publish cannot have written: not published.
        assert!(!pending().already_published(&keys).unwrap());
        std::fs::write(tmp.path().join(SERVICE_FILE), "user=x\n[a\n").unwrap();
        assert!(!pending().already_published(&keys).unwrap());
        service("a", "b");
        assert!(!pending().already_published(&keys).unwrap());
        service("a_alt", "b_alt");
        assert!(pending().already_published(&keys).unwrap());
        // Half published is no state of ours.
        service("a_alt", "b");
        let err = pending().already_published(&keys).unwrap_err();
        assert!(
            format!("{err:#}").contains("some of the staged logins"),
            "{err:#}"
        );
    }
}
