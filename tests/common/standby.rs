//! Hot standbys of a harness primary (`Standby`): a base backup (`pg_basebackup -R`),
//! started by whoever tests it (`run` as its supervisor, or `start` for a sidecar's
//! server), and promoted with `pg_ctl promote`.

use std::path::PathBuf;

use super::*;

/// A hot standby of a harness primary: a base backup (`pg_basebackup -R`) in a directory
/// of the server's OS user, its socket directory and a free port; not started.
pub struct Standby {
    /// Removed (with the data) when the test ends.
    pub root: tempfile::TempDir,
    pub data: PathBuf,
    pub sock: PathBuf,
    pub port: u16,
    /// Started by `start` (so stopped on drop); a server `run` supervises is its own.
    started: bool,
}

impl Standby {
    pub fn of(primary: &Cluster, prefix: &str) -> Standby {
        let root = server_dir(prefix);
        let data = root.path().join("data");
        let sock = root.path().join("sock");
        output_ok(
            as_server_user(pg_bin("pg_basebackup"))
                .arg("-D")
                .arg(&data)
                .args(["-R", "-X", "stream", "-U", "postgres", "-h"])
                .arg(&primary.sock)
                .args(["-p", &primary.port.to_string()]),
            "pg_basebackup",
        );
        assert!(
            as_server_user("mkdir")
                .arg(&sock)
                .status()
                .unwrap()
                .success()
        );
        Standby {
            root,
            data,
            sock,
            port: free_port(),
            started: false,
        }
    }

    /// `pg_ctl start -w` on its own port and socket, listening on 127.0.0.1.
    pub fn start(&mut self) {
        output_ok(
            as_server_user(pg_bin("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.root.path().join("server.log"))
                .arg("-o")
                .arg(format!(
                    "-p {} -k {} -c listen_addresses=127.0.0.1",
                    self.port,
                    self.sock.display()
                ))
                .args(["-w", "-t", "60", "start"]),
            "pg_ctl start (standby)",
        );
        self.started = true;
    }

    /// `pg_ctl promote -w`: returns once the server is a primary.
    pub fn promote(&self) {
        output_ok(
            as_server_user(pg_bin("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-t", "60", "promote"]),
            "pg_ctl promote",
        );
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        if self.started {
            let _ = as_server_user(pg_bin("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}
