//! Leak checks: a secret must not appear in the server log, in any output of the binary,
//! or in the argv/environment of any process (sampled while each run lived, and of every
//! process alive at the time of the check). Failures name the place, never the text: the
//! text would put the secret into the test output.

use super::{Cluster, Run};

/// argv and environment of a process, NULs shown as spaces.
pub fn proc_strings(pid: u32) -> Vec<String> {
    ["cmdline", "environ"]
        .iter()
        .filter_map(|f| std::fs::read(format!("/proc/{pid}/{f}")).ok())
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .collect()
}

/// argv and environment of every process on the machine right now.
pub fn all_proc_strings() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            {
                out.extend(proc_strings(pid));
            }
        }
    }
    out
}

/// Asserts that none of `secrets` appears in the server log, in any run's stdout/stderr,
/// in the argv/environ sampled from those runs, or in any live process's argv/environ.
#[track_caller]
pub fn assert_no_leak(secrets: &[&str], cluster: Option<&Cluster>, runs: &[&Run]) {
    let logs = cluster
        .map(|cluster| ("server log".to_owned(), cluster.log_text()))
        .into_iter()
        .collect();
    assert_no_leak_in(secrets, logs, runs);
}

/// `assert_no_leak` with any logs (place, text): a Patroni cluster's node logs, say.
#[track_caller]
pub fn assert_no_leak_in(secrets: &[&str], logs: Vec<(String, String)>, runs: &[&Run]) {
    let mut places = logs;
    for run in runs {
        places.push((format!("stdout of {}", run.command), run.stdout.clone()));
        places.push((format!("stderr of {}", run.command), run.stderr.clone()));
        for seen in &run.proc_seen {
            places.push((format!("a process of {}", run.command), seen.clone()));
        }
    }
    for seen in all_proc_strings() {
        places.push(("a live process's cmdline/environ".into(), seen));
    }
    for secret in secrets {
        assert!(!secret.is_empty());
        for (place, text) in &places {
            assert!(!text.contains(secret), "a secret leaked into {place}");
        }
    }
}

impl Run {
    /// Asserts that none of `values` occurs in stdout or stderr (empty values, which tests
    /// catch separately, are skipped: every string contains them). For commands whose
    /// output is all the test needs to look at, such as `generate`.
    #[track_caller]
    pub fn assert_output_free_of<'a>(&self, values: impl IntoIterator<Item = &'a [u8]>) {
        for value in values.into_iter().filter(|v| !v.is_empty()) {
            let text = String::from_utf8_lossy(value);
            // The command and status only: the output holds the secret.
            assert!(
                !self.stdout.contains(&*text) && !self.stderr.contains(&*text),
                "a secret value appears in the output of {} ({})",
                self.command,
                self.status
            );
        }
    }
}

/// Asserts that two snapshots of a secrets directory (file name → content) are equal, and
/// on failure names the files that differ, never their content (`assert_eq!` would print
/// every secret of both).
#[track_caller]
pub fn assert_same_files(
    left: &std::collections::BTreeMap<String, Vec<u8>>,
    right: &std::collections::BTreeMap<String, Vec<u8>>,
    what: &str,
) {
    let differ: Vec<&str> = left
        .keys()
        .chain(right.keys())
        .filter(|name| left.get(*name) != right.get(*name))
        .map(String::as_str)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(differ.is_empty(), "{what}: these files differ: {differ:?}");
}
