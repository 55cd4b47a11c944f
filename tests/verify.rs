//! `verify` against real PostgreSQL 15 clusters whose pg_hba.conf trusts 127.0.0.1 (as the
//! official image's does) and asks for SCRAM everywhere else: a login over a trusted
//! connection proves nothing, so verify must call it `not verifiable` and fail, log in
//! for real where the password is checked, and find such an address on its own.

use crate::common::*;
use std::time::Duration;

/// The official image's pg_hba.conf in substance: trust on the socket and on loopback,
/// then the appended line that checks passwords for every other address.
const OFFICIAL_HBA: &str = "local all all trust\n\
                            host all all 127.0.0.1/32 trust\n\
                            host all all ::1/128 trust\n\
                            host all all all scram-sha-256\n";
const NOT_VERIFIABLE: &str = "not verifiable (the server trusts this connection: pg_hba.conf";

/// A started cluster with `OFFICIAL_HBA` (or `hba`), listening on `listen`, the four
/// default roles with their passwords, and keys holding the same passwords.
fn official_cluster(listen: &str) -> (Cluster, Keys, Vec<String>) {
    cluster_with(listen, OFFICIAL_HBA)
}

fn cluster_with(listen: &str, hba: &str) -> (Cluster, Keys, Vec<String>) {
    let cluster = Cluster::start_with(&ClusterOptions {
        extra_conf: vec![format!("listen_addresses = '{listen}'")],
        hba: Some(hba.into()),
    });
    let keys = Keys::new();
    let secrets = keys.write_new(&DEFAULT_ROLES, "verify pw'\"\\ ü");
    let pairs: Vec<(&str, &str)> = DEFAULT_ROLES
        .iter()
        .map(|(role, _)| *role)
        .zip(secrets.iter().map(String::as_str))
        .collect();
    cluster.create_roles(&pairs);
    // Setup sent the plaintext through psql; the leak checks look at what verify causes.
    cluster.clear_log();
    (cluster, keys, secrets)
}

fn verify(cluster: &Cluster, keys: &Keys, extra: &[&str]) -> Run {
    let mut cmd = bin_for("verify", cluster, keys);
    cmd.args(extra);
    run(cmd)
}

fn refs(secrets: &[String]) -> Vec<&str> {
    secrets.iter().map(String::as_str).collect()
}

#[test]
fn a_trusted_address_is_not_verifiable_even_with_wrong_passwords() {
    let (cluster, keys, secrets) = official_cluster("127.0.0.1");
    let out = verify(&cluster, &keys, &["--host", "127.0.0.1"]);
    let out = out.expect_code(7);
    for (role, _) in DEFAULT_ROLES {
        out.expect_stdout(&format!("role \"{role}\": {NOT_VERIFIABLE}"));
    }
    out.expect_stderr("--host");

    // Every file wrong: the old verify said "ok" four times here.
    keys.write_new(&DEFAULT_ROLES, "wrong");
    let wrong = verify(&cluster, &keys, &["--host", "127.0.0.1"]);
    let wrong = wrong.expect_code(7);
    assert_eq!(
        wrong.stdout.matches(NOT_VERIFIABLE).count(),
        4,
        "{}",
        wrong.describe()
    );
    assert!(!wrong.stdout.contains(": ok"), "{}", wrong.describe());

    // Without --host and with nothing but loopback to try, the answer is the same.
    let auto = verify(&cluster, &keys, &[]);
    let auto = auto.expect_code(7);
    assert_eq!(
        auto.stdout.matches(NOT_VERIFIABLE).count(),
        4,
        "{}",
        auto.describe()
    );
    assert_no_leak(&refs(&secrets), Some(&cluster), &[&out, &wrong, &auto]);
}

#[test]
fn a_checked_address_is_a_real_check_and_a_wrong_password_still_fails() {
    // Trust for 127.0.0.1 only; ::1 falls through to the SCRAM line. (Another 127/8
    // address would not do: the kernel picks 127.0.0.1 as its source address.)
    let hba = "local all all trust\n\
               host all all 127.0.0.1/32 trust\n\
               host all all all scram-sha-256\n";
    let (cluster, keys, secrets) = cluster_with("127.0.0.1,::1", hba);
    let out = verify(&cluster, &keys, &["--host", "::1"]);
    let out = out.expect_ok();
    assert_eq!(
        out.stdout
            .matches(": ok (logs in; a wrong password is refused)")
            .count(),
        4,
        "{}",
        out.describe()
    );
    // The decoy was really refused by the server, once per role.
    let log = cluster.log_text();
    assert!(
        log.matches("password authentication failed").count() >= 4,
        "{log}"
    );

    keys.write("postgres_app_ro_pw", &unique("wrong"));
    let wrong = verify(&cluster, &keys, &["--host", "::1"]);
    let wrong = wrong.expect_code(7);
    wrong.expect_stdout("role \"backupuser\": FAILED");
    assert_eq!(
        wrong.stdout.matches(": ok").count(),
        3,
        "{}",
        wrong.describe()
    );
    assert!(!wrong.stdout.contains("not verifiable"));
    assert_no_leak(&refs(&secrets), Some(&cluster), &[&out, &wrong]);
}

/// This machine's non-loopback IPv4 addresses (`hostname -I`), to know whether discovery
/// has anything to find here.
fn non_loopback_ipv4() -> Vec<String> {
    std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter(|a| a.contains('.') && !a.starts_with("127."))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// `non_loopback_ipv4`, or `None` with the test skipped when there is none.
fn discoverable_ipv4() -> Option<Vec<String>> {
    let own = non_loopback_ipv4();
    if own.is_empty() {
        skip("no non-loopback IPv4 address on this machine to discover");
        return None;
    }
    Some(own)
}

#[test]
fn without_host_it_finds_its_own_checked_address_when_loopback_is_trusted() {
    if discoverable_ipv4().is_none() {
        return;
    }
    let (cluster, keys, secrets) = official_cluster("*");
    let out = verify(&cluster, &keys, &[]);
    let out = out.expect_ok();
    assert_eq!(
        out.stdout
            .matches(": ok (logs in; a wrong password")
            .count(),
        4
    );
    out.expect_stderr("127.0.0.1");
    out.expect_stderr("accepts a wrong password");
    let chosen = out
        .stderr
        .lines()
        .find_map(|l| l.split("verifying at ").nth(1))
        .unwrap_or_else(|| panic!("no 'verifying at' line: {}", out.describe()));
    assert!(!chosen.starts_with("127."), "{chosen}");

    // The discovered address checks passwords: a wrong one fails, not "not verifiable".
    keys.write("postgres_app_user_pw", &unique("wrong"));
    let wrong = verify(&cluster, &keys, &[]);
    let wrong = wrong.expect_code(7);
    wrong.expect_stdout("role \"appuser\": FAILED");
    assert!(
        !wrong.stdout.contains("not verifiable"),
        "{}",
        wrong.describe()
    );
    assert_no_leak(&refs(&secrets), Some(&cluster), &[&out, &wrong]);
}

#[test]
fn json_report_says_not_verifiable() {
    let (cluster, keys, _) = official_cluster("127.0.0.1");
    let out = verify(
        &cluster,
        &keys,
        &["--host", "127.0.0.1", "--format", "json"],
    );
    let out = out.expect_code(7);
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {}", out.describe()));
    let rows = report.as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for row in rows {
        assert_eq!(row["status"], "not_verifiable", "{row}");
        assert_eq!(row["ok"], false, "{row}");
    }
}

/// A stand-in for a server that a local user without any privilege can start where the
/// real server does not listen (a port above 1024 on the machine's own address): it asks
/// every login for its password in clear text, keeps what it gets, and refuses it as a
/// wrong password (SQLSTATE 28P01), which is exactly what verify's wrong-password probe
/// takes as "the server checks passwords here".
struct PasswordHarvester {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

/// What the stand-in does with the `n`th connection (from 1).
#[derive(Clone, Copy)]
enum StandIn {
    /// Asks for the password in clear text, keeps it, refuses it.
    Harvest,
    /// Refuses the first two connections (the discovery probe, the first role's decoy) and
    /// then every other one, and lets the rest in without asking for anything: each decoy
    /// is refused and each real login accepted, as if the password were checked.
    Fickle,
}

impl PasswordHarvester {
    fn listen(address: &str, port: u16) -> PasswordHarvester {
        PasswordHarvester::stand_in(address, port, StandIn::Harvest)
    }

    fn stand_in(address: &str, port: u16, mode: StandIn) -> PasswordHarvester {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind((address, port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut harvest = Vec::new();
            let mut n = 0;
            while !stopped.load(Ordering::Relaxed) {
                let mut conn = match listener.accept() {
                    Ok((conn, _)) => conn,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut len = [0u8; 4];
                if conn.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut startup = vec![0u8; u32::from_be_bytes(len) as usize - 4];
                if conn.read_exact(&mut startup).is_err() {
                    continue;
                }
                n += 1;
                match mode {
                    StandIn::Fickle if n > 2 && n % 2 == 1 => {
                        // AuthenticationOk, then ReadyForQuery (idle).
                        let _ = conn.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]);
                        let _ = conn.write_all(&[b'Z', 0, 0, 0, 5, b'I']);
                        // Held open until the client closes it.
                        let _ = conn.read(&mut [0u8; 64]);
                        continue;
                    }
                    StandIn::Fickle => {}
                    StandIn::Harvest => {
                        // AuthenticationCleartextPassword.
                        let _ = conn.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
                        let mut head = [0u8; 5];
                        if conn.read_exact(&mut head).is_err() || head[0] != b'p' {
                            continue;
                        }
                        let len =
                            u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
                        let mut body = vec![0u8; len];
                        if conn.read_exact(&mut body).is_ok() {
                            let text = String::from_utf8_lossy(&body);
                            harvest.push(text.trim_end_matches('\0').to_owned());
                        }
                    }
                }
                let mut fields = Vec::new();
                for (code, value) in [
                    (b'S', "FATAL"),
                    (b'V', "FATAL"),
                    (b'C', "28P01"),
                    (b'M', "password authentication failed"),
                ] {
                    fields.push(code);
                    fields.extend_from_slice(value.as_bytes());
                    fields.push(0);
                }
                fields.push(0);
                let mut error = vec![b'E'];
                error.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
                error.extend_from_slice(&fields);
                let _ = conn.write_all(&error);
            }
            harvest
        });
        PasswordHarvester {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops listening; what it was sent.
    fn harvest(mut self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

#[test]
fn a_local_user_listening_on_the_discovered_address_gets_no_password() {
    let Some(own) = discoverable_ipv4() else {
        return;
    };
    // The server listens on loopback only (trusted there), so verify looks further, and
    // the port on the machine's own address is free for anyone to take.
    let (cluster, keys, secrets) = official_cluster("127.0.0.1");
    let harvester = PasswordHarvester::listen(&own[0], cluster.port);
    let out = verify(&cluster, &keys, &[]);
    let harvest = harvester.harvest();
    assert!(out.code() != Some(0), "{}", out.describe());
    for secret in &secrets {
        assert!(
            !harvest.iter().any(|sent| sent == secret),
            "verify sent a real password in clear text to whoever listened on {}",
            own[0]
        );
    }
    assert!(!out.stdout.contains(": ok"), "{}", out.describe());
    assert_no_leak(&refs(&secrets), Some(&cluster), &[&out]);
}

#[test]
fn a_server_asking_for_the_password_in_clear_text_is_not_sent_it() {
    // `password` in pg_hba.conf without TLS: the real server, but the password would
    // cross the network in clear text (and a server that asks so proves nothing about
    // knowing the password: SCRAM's final message does).
    let hba = "local all all trust\nhost all all 127.0.0.1/32 password\n";
    let (cluster, keys, secrets) = cluster_with("127.0.0.1", hba);
    let out = verify(&cluster, &keys, &["--host", "127.0.0.1"]);
    let out = out.expect_code(7);
    out.expect_stdout("clear text");
    assert!(!out.stdout.contains(": ok"), "{}", out.describe());
    assert_no_leak(&refs(&secrets), Some(&cluster), &[&out]);
}

#[test]
fn a_stand_in_that_refuses_each_decoy_and_lets_each_real_login_in_is_not_ok() {
    let Some(own) = discoverable_ipv4() else {
        return;
    };
    let (cluster, keys, secrets) = official_cluster("127.0.0.1");
    let stand_in = PasswordHarvester::stand_in(&own[0], cluster.port, StandIn::Fickle);
    let out = verify(&cluster, &keys, &[]);
    stand_in.harvest();
    assert!(
        !out.stdout.contains(": ok"),
        "verify called a login ok that proved nothing: {}",
        out.describe()
    );
    assert!(out.code() != Some(0), "{}", out.describe());
    assert_no_leak(&refs(&secrets), Some(&cluster), &[&out]);
}
