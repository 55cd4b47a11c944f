//! pg-password-sync in a cluster: a real 3-node Patroni cluster on etcd (`common::patroni`)
//! with a `watch` sidecar beside every node, the default role map, as in
//! docs/clusters.md. Each test is one scenario: the first sync, a rotation, a switchover
//! then a rotation, a failover with a rotation written while no leader exists (timed from
//! the promotion to the new password in force), the old leader rejoining, overlap mode
//! across a failover; then `run` with Patroni as its CMD, the libpq multi-host addressing
//! of the commands run from outside during a switchover, and a client fleet behind
//! PgBouncer through overlap-mode rotations.
//!
//! Every Patroni test ends with the same two checks (`Setup::finish`): no statement of
//! pg-password-sync that writes was ever sent to a node while it was a replica (its server
//! log, which logs every statement with the application's name, says what each node got
//! and when it was a replica), and no secret (a rotated password, the superuser's file,
//! Patroni's own passwords) in any server, Patroni, etcd or sidecar log, output, argv or
//! environment.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::source::{PAIRS, SERVICE_FILE, Source, create_app_roles, rotate_cmd};
use crate::common::*;

/// Liveness bound for a password to be in force, a sidecar to report.
const LIMIT: Duration = Duration::from_secs(30);

/// The application roles of the default role map (the superuser is Patroni's).
const APP_ROLES: [(&str, &str); 3] = [
    ("appuser", "postgres_app_user_pw"),
    ("backupuser", "postgres_app_ro_pw"),
    ("temporaluser", "postgres_temporal_pw"),
];

/// What every sidecar says once when it leaves the superuser to Patroni.
const LEFT_TO_PATRONI: &str = "is left to Patroni";

/// A 3-node Patroni cluster, the application roles, and a sidecar beside every node.
struct Setup {
    cluster: PatroniCluster,
    keys: Keys,
    /// `sidecars[i]` watches node `i`.
    sidecars: Vec<Option<Running>>,
    /// Every value written to a secret file, and Patroni's superuser password.
    secrets: Vec<String>,
    /// The application roles' passwords now, in `APP_ROLES` order.
    app: Vec<String>,
}

impl Setup {
    /// The cluster, the roles and the sidecars (`extra`: more arguments for each), once the
    /// first sync is in force on every node.
    fn start(extra: &[&str]) -> Setup {
        let keys = Keys::new();
        let patroni_password = unique("patroni-superuser");
        let cluster = PatroniCluster::start(3, &patroni_password);
        // The superuser's file holds another password than Patroni's: the sidecars must
        // leave the superuser alone.
        let superuser_file = unique("superuser-file");
        keys.write("postgres_password", &superuser_file);
        let leader = cluster.leader().expect("a leader");
        create_roles(&cluster.nodes[leader], &APP_ROLES.map(|(role, _)| role));
        let app = keys.write_new(&APP_ROLES, "first");
        let mut setup = Setup {
            sidecars: Vec::new(),
            secrets: [vec![patroni_password, superuser_file], app.clone()].concat(),
            app,
            keys,
            cluster,
        };
        for i in 0..setup.cluster.nodes.len() {
            let sidecar = setup.sidecar(i, extra);
            setup.sidecars.push(Some(sidecar));
        }
        setup.wait_in_force_everywhere();
        setup
    }

    /// `watch` beside node `i`, with the temporal role too.
    fn sidecar(&self, i: usize, extra: &[&str]) -> Running {
        let mut args = vec!["--temporal-db-user", "temporaluser"];
        args.extend(extra);
        sidecar_at(&self.cluster.nodes[i], self.keys.path(), &args)
    }

    fn sidecar_log(&self, i: usize) -> String {
        self.sidecars[i]
            .as_ref()
            .map(Running::stderr_so_far)
            .unwrap_or_default()
    }

    /// How many role changes the sidecar of node `i` has applied so far.
    fn sidecar_changes(&self, i: usize) -> usize {
        self.sidecar_log(i).matches(": changed").count()
    }

    /// The sidecar of node `i` applied nothing since it had applied `before` changes
    /// (it no longer leads: `when`).
    fn assert_sidecar_wrote_nothing_after(&self, i: usize, before: usize, when: &str) {
        let log = self.sidecar_log(i);
        assert_eq!(
            log.matches(": changed").count(),
            before,
            "the old leader's sidecar wrote after the {when}:\n{log}"
        );
    }

    /// Writes new passwords for every application role (renamed into place).
    fn rotate(&mut self, prefix: &str) {
        self.app = self.keys.write_new(&APP_ROLES, prefix);
        self.secrets.extend(self.app.iter().cloned());
    }

    /// Whether every application role logs in on node `i` with its password now.
    fn in_force_on(&self, i: usize) -> bool {
        let node = &self.cluster.nodes[i];
        APP_ROLES
            .iter()
            .zip(&self.app)
            .all(|((role, _), password)| node.login(role, password).is_ok())
    }

    /// Waits until the passwords are in force on node `i`.
    fn wait_in_force(&self, i: usize) {
        wait_until(
            LIMIT,
            &format!("the passwords in force on {}", self.cluster.nodes[i].name),
            || self.in_force_on(i),
        );
    }

    /// Waits until the passwords are in force on every node that runs (replicas by
    /// replication).
    fn wait_in_force_everywhere(&self) {
        for i in 0..self.cluster.nodes.len() {
            if self.cluster.nodes[i].postmaster_pid().is_some() {
                self.wait_in_force(i);
            }
        }
    }

    /// The superuser is still Patroni's on node `i`: Patroni's password logs in, the
    /// superuser's file does not.
    fn assert_superuser_is_patronis(&self, i: usize) {
        let node = &self.cluster.nodes[i];
        node.login("postgres", self.cluster.superuser_password())
            .unwrap_or_else(|err| panic!("Patroni's superuser on {}: {err}", node.name));
        assert!(
            node.login("postgres", &self.secrets[1]).is_err(),
            "the superuser's file was applied on {}",
            node.name
        );
    }

    /// The checks every cluster test ends with (`finish`).
    fn finish(mut self) {
        let sidecars = self.sidecars.iter_mut().filter_map(Option::take).collect();
        finish(&self.cluster, sidecars, Vec::new(), &self.secrets);
    }
}

/// Creates LOGIN `roles` on `node` (the leader) with a throwaway password.
fn create_roles(node: &Node, roles: &[&str]) {
    let throwaway = unique("throwaway");
    let sql: String = roles
        .iter()
        .map(|role| {
            format!(
                "CREATE ROLE {role} LOGIN PASSWORD {};\n",
                quote_literal(&throwaway)
            )
        })
        .collect();
    node.psql(&sql);
}

/// `watch` beside `node`: its socket, port and data directory, the secrets in `keys`,
/// a 50 ms debounce, plus `extra`.
fn sidecar_at(node: &Node, keys: &std::path::Path, extra: &[&str]) -> Running {
    let state = node.dir.join("sidecar-state");
    let _ = std::fs::create_dir(&state);
    let mut cmd = bin();
    cmd.arg("watch")
        .args(node.conn_args())
        .arg("--keys-dir")
        .arg(keys)
        .arg("--secrets-source-dir")
        .arg(node.dir.join("no-docker-secrets"))
        .args(["--debounce", "50ms", "--state-dir"])
        .arg(&state)
        .args(extra);
    Running::spawn(cmd)
}

/// The checks every Patroni test ends with: the sidecars stop cleanly (SIGTERM, exit 0),
/// no statement that writes ever reached a replica, and no secret anywhere (the logs of
/// every node and of etcd, the outputs of `runs` and the sidecars, any process).
fn finish(
    cluster: &PatroniCluster,
    sidecars: Vec<Running>,
    mut runs: Vec<Run>,
    secrets: &[String],
) {
    for sidecar in sidecars {
        sidecar.signal(Signal::SIGTERM);
        runs.push(sidecar.finish(LIMIT).expect_ok());
    }
    for node in &cluster.nodes {
        assert_nothing_written_while_replica(node);
    }
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let runs: Vec<&Run> = runs.iter().collect();
    assert_no_leak_in(&secrets, cluster.logs(), &runs);
}

/// What pg-password-sync sends to a primary to write, and never to a replica: the
/// transaction of the sync and the statements inside it (the ones inside are not logged
/// on a primary; on a replica the transaction would never get that far).
const WRITES: [&str; 6] = [
    "log_transaction_sample_rate",
    "BEGIN",
    "pg_advisory",
    "ALTER ROLE",
    "CREATE ROLE",
    "COMMENT ON",
];

/// No statement of pg-password-sync's that writes reached `node` while it was a replica,
/// and no write failed there for being in recovery.
#[track_caller]
fn assert_nothing_written_while_replica(node: &Node) {
    let statements = node.statements_while_replica("pg-password-sync");
    let writes: Vec<&String> = statements
        .iter()
        .filter(|line| WRITES.iter().any(|w| line.contains(w)))
        .collect();
    assert!(
        writes.is_empty(),
        "{} got statements that write while it was a replica: {writes:#?}",
        node.name
    );
    let refused: Vec<String> = node
        .server_lines()
        .into_iter()
        .filter(|l| l.contains("read-only transaction") || l.contains("recovery is in progress"))
        .collect();
    assert!(refused.is_empty(), "{}: {refused:#?}", node.name);
}

/// Node indexes other than `leader`.
fn replicas(setup: &Setup, leader: usize) -> Vec<usize> {
    (0..setup.cluster.nodes.len())
        .filter(|&i| i != leader)
        .collect()
}

/// The first sync with the default role map: the leader's sidecar applies the
/// application roles' passwords, the replicas receive them by replication and their
/// sidecars write nothing; the superuser keeps Patroni's password on every node (its
/// pg_rewind and replicas log in with it), and every sidecar says once that it is left
/// to Patroni.
#[test]
fn patroni_sidecars_make_the_first_sync_on_the_leader_only() {
    let setup = Setup::start(&[]);
    let leader = setup.cluster.leader().expect("a leader");
    let log = setup.sidecar_log(leader);
    assert!(
        log.contains("role \"appuser\": changed"),
        "the leader's sidecar applied the passwords:\n{log}"
    );
    for i in replicas(&setup, leader) {
        let log = setup.sidecar_log(i);
        assert!(
            log.contains("standby") && !log.contains(": changed"),
            "{}'s sidecar skipped the sync:\n{log}",
            setup.cluster.nodes[i].name
        );
        // What the sidecar asked the replica is in its log: the check that nothing else
        // was sent there (`finish`) looks at something.
        let asked = setup.cluster.nodes[i].statements_while_replica("pg-password-sync");
        assert!(
            asked.iter().any(|l| l.contains("pg_is_in_recovery")),
            "{asked:#?}"
        );
    }
    for i in 0..3 {
        setup.assert_superuser_is_patronis(i);
        let log = setup.sidecar_log(i);
        assert_eq!(log.matches(LEFT_TO_PATRONI).count(), 1, "said once:\n{log}");
        assert!(!log.contains("role \"postgres\""), "{log}");
    }
    setup.finish();
}

/// A rotation: the leader's sidecar applies it, the replicas receive it by replication,
/// and their sidecars, which see the same file change, write nothing.
#[test]
fn patroni_a_rotation_is_applied_by_the_leader_and_replicated() {
    let mut setup = Setup::start(&[]);
    let leader = setup.cluster.leader().expect("a leader");
    let before: Vec<usize> = (0..3)
        .map(|i| setup.sidecar_log(i).matches("standby").count())
        .collect();
    setup.rotate("rotated");
    setup.wait_in_force_everywhere();
    wait_until(LIMIT, "the leader's sidecar to report", || {
        setup.sidecar_log(leader).contains("passwords rotated")
    });
    for i in replicas(&setup, leader) {
        wait_until(LIMIT, "a replica's sidecar to skip the rotation", || {
            setup.sidecar_log(i).matches("standby").count() > before[i]
        });
        let log = setup.sidecar_log(i);
        assert!(!log.contains("passwords rotated"), "{log}");
    }
    setup.finish();
}

/// A switchover, then a rotation: the new leader's sidecar sees its server promoted
/// (checking every role finds nothing to change: the passwords came by replication),
/// then applies the rotation; the old leader, a replica now, receives it, and its sidecar
/// writes nothing more.
#[test]
fn patroni_a_switchover_then_a_rotation_reach_the_new_leader() {
    let mut setup = Setup::start(&[]);
    let old = setup.cluster.leader().expect("a leader");
    let new = replicas(&setup, old)[0];
    setup.cluster.switchover(old, new);
    assert_eq!(setup.cluster.wait_leader(None), new);
    wait_until(
        LIMIT,
        "the new leader's sidecar to see the promotion",
        || setup.sidecar_log(new).contains("promoted"),
    );
    wait_until(
        CLUSTER_LIMIT,
        "the old leader to follow the new one",
        || setup.cluster.nodes[old].is_replica() && streams(&setup.cluster.nodes[old]),
    );
    let applied_by_old = setup.sidecar_changes(old);
    setup.rotate("after-switchover");
    setup.wait_in_force(new);
    setup.wait_in_force_everywhere();
    wait_until(LIMIT, "the new leader's sidecar to report", || {
        setup.sidecar_log(new).contains("passwords rotated")
    });
    setup.assert_sidecar_wrote_nothing_after(old, applied_by_old, "switchover");
    for i in 0..3 {
        setup.assert_superuser_is_patronis(i);
    }
    setup.finish();
}

/// When `node` stops being in recovery, seen on a connection kept for the purpose
/// (Patroni's superuser, over TCP) and asked every 5 ms; `None` while it still is.
fn promoted(port: u16, password: &str) -> bool {
    block_on(async {
        let config = tcp_login_config(port, "postgres", password);
        let Ok((client, connection)) = config.connect(tokio_postgres::NoTls).await else {
            return false;
        };
        tokio::spawn(connection);
        client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .is_ok_and(|row| !row.get::<_, bool>(0))
    })
}

/// A failover: the leader dies (Patroni and its postmaster killed). While no node leads,
/// a rotation is written: the replicas' sidecars see it and skip it. When one replica is
/// promoted, its sidecar applies the rotation within a second of the promotion (the time
/// is printed). The promotion is the instant the server stops being in recovery; "in
/// force" is the first login with the new password that works.
#[test]
fn patroni_a_rotation_written_while_no_leader_exists_is_in_force_within_a_second_of_the_promotion()
{
    let mut setup = Setup::start(&[]);
    let old = setup.cluster.leader().expect("a leader");
    let candidates = replicas(&setup, old);
    let skipped: Vec<usize> = (0..3)
        .map(|i| setup.sidecar_log(i).matches("standby").count())
        .collect();
    setup.cluster.nodes[old].kill();
    assert_eq!(setup.cluster.leader(), None, "no leader after the kill");
    setup.rotate("during-failover");
    for &i in &candidates {
        wait_until(LIMIT, "the replicas' sidecars to skip the rotation", || {
            setup.sidecar_log(i).matches("standby").count() > skipped[i]
        });
    }
    assert_eq!(
        setup.cluster.leader(),
        None,
        "the rotation was written while no node led (raise the TTL?)"
    );
    let password = setup.cluster.superuser_password().to_owned();
    let mut new = None;
    let deadline = Instant::now() + CLUSTER_LIMIT;
    while new.is_none() {
        assert!(Instant::now() < deadline, "no replica was promoted");
        new = candidates
            .iter()
            .copied()
            .find(|&i| promoted(setup.cluster.nodes[i].port, &password));
        std::thread::sleep(Duration::from_millis(5));
    }
    let new = new.unwrap();
    let promoted_at = Instant::now();
    let node = &setup.cluster.nodes[new];
    wait_until(LIMIT, "the rotation in force on the new leader", || {
        node.login(APP_ROLES[0].0, &setup.app[0]).is_ok()
    });
    let in_force = promoted_at.elapsed();
    eprintln!(
        "failover: {} promoted; the rotation written while no node led was in force there \
         {} ms after the promotion",
        node.name,
        in_force.as_millis()
    );
    assert!(
        in_force < Duration::from_secs(1),
        "{in_force:?} from the promotion to the new password in force:\n{}",
        setup.sidecar_log(new)
    );
    setup.wait_in_force(new);
    assert!(setup.sidecar_log(new).contains("promoted"));
    setup.finish();
}

/// The old leader rejoins after a failover: a rotation made while it was down reaches it
/// by replication; Patroni rewinds it (`pg_rewind` logs in to the new leader as the
/// superuser, with the password of Patroni's configuration, which no sidecar changed) and
/// it streams from the new leader; its sidecar, which applied the first sync when its
/// server led, writes nothing once it is a replica.
#[test]
fn patroni_the_old_leader_rejoins_after_a_failover() {
    let mut setup = Setup::start(&[]);
    let old = setup.cluster.leader().expect("a leader");
    setup.cluster.nodes[old].kill();
    let new = setup.cluster.wait_leader(Some(old));
    setup.rotate("while-the-old-leader-is-down");
    setup.wait_in_force(new);
    let applied_by_old = setup.sidecar_changes(old);
    setup.cluster.nodes[old].start();
    let started = Instant::now();
    wait_until(CLUSTER_LIMIT, "the old leader to rejoin and stream", || {
        setup.cluster.nodes[old].is_replica() && streams(&setup.cluster.nodes[old])
    });
    eprintln!(
        "failover: {} rejoined as a replica {:?} after its Patroni started",
        setup.cluster.nodes[old].name,
        started.elapsed()
    );
    setup.wait_in_force(old);
    let log = setup.cluster.nodes[old].log_text();
    if log.contains("running pg_rewind") {
        assert!(log.contains("pg_rewind exit code=0"), "pg_rewind failed");
        eprintln!("failover: the old leader was rewound (pg_rewind as the superuser)");
    }
    wait_until(LIMIT, "the old leader's sidecar to see a standby", || {
        setup.sidecar_log(old).contains("standby")
    });
    setup.assert_sidecar_wrote_nothing_after(old, applied_by_old, "failover");
    for i in 0..3 {
        setup.assert_superuser_is_patronis(i);
    }
    setup.finish();
}

/// `run` with Patroni as its CMD (one node), as PID 1 of a pid namespace where one can be
/// made (the container's case), else as a subreaper: Patroni bootstraps the cluster and
/// starts the postmaster, which is not CMD but a descendant of it (Patroni's helper
/// exits, and the orphan is `run`'s); `run` takes it for the final server, makes the first
/// sync there (leaving the superuser to Patroni), applies rotations, keeps `health` green
/// across a restart of the server by Patroni (a new postmaster pid), and a SIGTERM
/// reaches Patroni, which stops its server; `run` exits with Patroni's status.
#[test]
fn patroni_as_the_cmd_of_run_is_synced_and_stopped() {
    let mode = if can_unshare() {
        Mode::Pid1
    } else {
        Mode::Subreaper
    };
    let keys = Keys::new();
    let superuser_file = unique("superuser-file");
    keys.write("postgres_password", &superuser_file);
    let mut secrets = vec![superuser_file.clone()];
    secrets.extend(keys.write_new(&APP_ROLES, "first"));
    let cluster = PatroniCluster::new(1, &unique("patroni-superuser"));
    secrets.push(cluster.superuser_password().to_owned());
    let node = &cluster.nodes[0];
    let under = UnderRun::start(mode, node, &keys);
    under
        .supervisor
        .wait_stderr(CLUSTER_LIMIT, "first sync done");
    let log = under.supervisor.stderr_so_far();
    assert!(log.contains("a postmaster CMD started"), "{log}");
    assert_eq!(log.matches(LEFT_TO_PATRONI).count(), 1, "{log}");
    // The roles exist once Patroni has bootstrapped; their passwords follow the files.
    wait_until(CLUSTER_LIMIT, "Patroni to lead", || node.is_leader());
    create_roles(node, &APP_ROLES.map(|(role, _)| role));
    secrets.extend(rotate_on(node, &keys, "rotated"));
    let healthy = under.health().expect_ok();
    // Patroni restarts its server: another postmaster, which `health` accepts.
    let before = node.postmaster_pid_line();
    cluster.restart(0);
    wait_until(CLUSTER_LIMIT, "the restarted server", || {
        node.postmaster_pid_line()
            .is_some_and(|pid| Some(&pid) != before.as_ref())
            && node.psql_output("SELECT 1").status.success()
    });
    secrets.extend(rotate_on(node, &keys, "after-restart"));
    let healthy_again = under.health().expect_ok();
    node.login("postgres", cluster.superuser_password())
        .expect("the superuser is Patroni's");
    assert!(node.login("postgres", &superuser_file).is_err());

    let mut supervisor = under.supervisor;
    supervisor.assert_alive();
    supervisor.signal(Signal::SIGTERM);
    let out = supervisor.finish(CLUSTER_LIMIT).expect_ok();
    assert!(out.stderr.contains("SIGTERM"), "{}", out.describe());
    assert_eq!(node.postmaster_pid(), None, "Patroni stopped its server");
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_leak_in(&secrets, cluster.logs(), &[&out, &healthy, &healthy_again]);
}

/// `run -- patroni …` for one node, and `health` where it runs.
struct UnderRun<'a> {
    supervisor: Running,
    mode: Mode,
    node: &'a Node,
    keys: &'a Keys,
}

impl<'a> UnderRun<'a> {
    fn start(mode: Mode, node: &'a Node, keys: &'a Keys) -> UnderRun<'a> {
        std::fs::create_dir(node.dir.join("run-state")).unwrap();
        let mut cmd = mode.bin();
        cmd.arg("run");
        run_flags(&mut cmd, node, keys);
        cmd.args(["--debounce", "50ms", "--"])
            .args(node.patroni_command());
        UnderRun {
            supervisor: Running::spawn_as(mode, cmd),
            mode,
            node,
            keys,
        }
    }

    /// `health` where `run` runs: inside its pid namespace, as `docker exec` would.
    fn health(&self) -> Run {
        let mut cmd = bin();
        if self.mode == Mode::Pid1 {
            cmd = std::process::Command::new("nsenter");
            cmd.env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .args(["-t", &self.supervisor.pid().to_string()])
                .args(["--pid", "--mount", BIN]);
        }
        cmd.arg("health");
        run_flags(&mut cmd, self.node, self.keys);
        run(cmd)
    }
}

/// The flags `run` and `health` share: the node, the keys, the state directory.
fn run_flags(cmd: &mut std::process::Command, node: &Node, keys: &Keys) {
    cmd.args(node.conn_args())
        .arg("--keys-dir")
        .arg(keys.path())
        .arg("--secrets-source-dir")
        .arg(node.dir.join("no-docker-secrets"))
        .args(["--temporal-db-user", "temporaluser"])
        .arg("--state-dir")
        .arg(node.dir.join("run-state"));
}

/// Writes new passwords for the application roles and waits until they log in on
/// `node`; returns them.
fn rotate_on(node: &Node, keys: &Keys, prefix: &str) -> Vec<String> {
    let app = keys.write_new(&APP_ROLES, prefix);
    for ((role, _), password) in APP_ROLES.iter().zip(&app) {
        wait_until(LIMIT, "the rotation in force", || {
            node.login(role, password).is_ok()
        });
    }
    app
}

/// The commands run from outside the cluster, pointed at every node with libpq's
/// multi-host form (`PGHOST=h1,h2,h3`, `PGPORT=p1,p2,p3`), through a switchover. The list
/// starts with replicas: with `PGTARGETSESSIONATTRS=any` the first server that answers is
/// used (a replica: the sync is skipped there), with `read-write` the leader. A `watch`
/// pointed at the list applies a rotation written during the switchover on the new
/// leader; one-shot `sync` runs during the switchover never write to a replica; after
/// it, `sync` and `verify` with the same settings reach the new leader.
#[test]
fn patroni_commands_from_outside_follow_the_leader_through_a_switchover() {
    let keys = Keys::new();
    // From outside, the superuser logs in over TCP with the password Patroni has.
    let patroni_password = unique("patroni-superuser");
    keys.write("postgres_password", &patroni_password);
    let mut app = keys.write_new(&APP_ROLES, "first");
    let mut secrets = vec![patroni_password.clone()];
    secrets.extend(app.iter().cloned());
    let cluster = PatroniCluster::start(3, &patroni_password);
    let leader = cluster.leader().expect("a leader");
    create_roles(&cluster.nodes[leader], &APP_ROLES.map(|(role, _)| role));
    // Replicas first, the leader last.
    let mut order: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    order.push(leader);
    let outside = Outside::new(&cluster, &order, &keys);
    let in_force_on = |i: usize, app: &[String]| {
        APP_ROLES
            .iter()
            .zip(app)
            .all(|((role, _), pw)| cluster.nodes[i].login(role, pw).is_ok())
    };
    // `any`: the first server, a replica; `read-write`: the leader.
    let any = run(outside.command("sync", "any")).expect_ok();
    any.expect_stdout("standby");
    assert!(!in_force_on(leader, &app));
    let rw = run(outside.command("sync", "read-write")).expect_ok();
    rw.expect_stdout_line(&["appuser", "changed"]);
    assert!(in_force_on(leader, &app));

    let mut watch = outside.command("watch", "read-write");
    watch
        .args(["--debounce", "50ms", "--state-dir"])
        .arg(outside.state.path());
    let watcher = Running::spawn(watch);
    watcher.wait_stderr(LIMIT, "watching 1 secret director");
    let new = order[0];
    let (rotated, during) = switchover_with_syncs(&cluster, leader, new, &outside, &keys);
    app.splice(..2, rotated);
    secrets.extend(app.iter().cloned());
    assert_eq!(cluster.wait_leader(None), new);
    wait_until(LIMIT, "the rotation in force on the new leader", || {
        in_force_on(new, &app)
    });
    let watcher_log = watcher.stderr_so_far();
    assert!(
        watcher_log.contains("passwords rotated: appuser, backupuser changed"),
        "the outside watcher applied the rotation:\n{watcher_log}"
    );

    // After the switchover, the same settings reach the new leader.
    let verify = outside.verify_at(&cluster.nodes[new]);
    watcher.signal(Signal::SIGTERM);
    let watched = watcher.finish(LIMIT).expect_ok();
    app = keys.write_new(&APP_ROLES, "after-switchover");
    secrets.extend(app.iter().cloned());
    let after = run(outside.command("sync", "read-write")).expect_ok();
    after.expect_stdout_line(&["appuser", "changed"]);
    assert!(in_force_on(new, &app));
    let mut runs = vec![any, rw, verify, watched, after];
    runs.extend(during);
    finish(&cluster, Vec::new(), runs, &secrets);
}

/// Commands run from outside the cluster, pointed at every node of it (in `order`) with
/// libpq's multi-host form.
struct Outside<'a> {
    hosts: String,
    ports: String,
    keys: &'a Keys,
    state: tempfile::TempDir,
}

impl<'a> Outside<'a> {
    fn new(cluster: &PatroniCluster, order: &[usize], keys: &'a Keys) -> Outside<'a> {
        let ports: Vec<String> = order
            .iter()
            .map(|&i| cluster.nodes[i].port.to_string())
            .collect();
        Outside {
            hosts: vec!["127.0.0.1"; order.len()].join(","),
            ports: ports.join(","),
            keys,
            state: tempfile::tempdir().unwrap(),
        }
    }

    /// `command` with the host list, `PGTARGETSESSIONATTRS=target` and `--patroni on`
    /// (there is no data directory to look at from outside).
    fn command(&self, command: &str, target: &str) -> std::process::Command {
        let mut cmd = bin();
        cmd.arg(command)
            .args(["--pghost", &self.hosts, "--pgport", &self.ports])
            .args(["--target-session-attrs", target, "--patroni", "on"])
            .args(["--pgdata", "/nonexistent"])
            .arg("--keys-dir")
            .arg(self.keys.path())
            .arg("--secrets-source-dir")
            .arg(self.state.path().join("none"))
            .args(["--temporal-db-user", "temporaluser"]);
        cmd
    }

    /// `verify` with `read-write`: every role logs in, at `leader`.
    fn verify_at(&self, leader: &Node) -> Run {
        let mut verify = self.command("verify", "read-write");
        verify.args(["--format", "json"]);
        let verify = run(verify).expect_ok();
        let checks: Vec<serde_json::Value> = serde_json::from_str(verify.stdout.trim()).unwrap();
        let at = format!("127.0.0.1:{}", leader.port);
        assert_eq!(checks.len(), APP_ROLES.len(), "{}", verify.describe());
        for check in &checks {
            assert_eq!(check["at"], at.as_str(), "{}", verify.describe());
            assert_eq!(check["ok"], true, "{}", verify.describe());
        }
        verify
    }
}

/// A switchover from `leader` to `new` with, while it runs, new passwords for the first
/// two application roles (returned) and one-shot syncs of the third role only (so that
/// what a watcher applies meanwhile is its own), none of which writes to a replica.
fn switchover_with_syncs(
    cluster: &PatroniCluster,
    leader: usize,
    new: usize,
    outside: &Outside,
    keys: &Keys,
) -> (Vec<String>, Vec<Run>) {
    let (rotated, during) = std::thread::scope(|scope| {
        let switchover = scope.spawn(|| cluster.switchover(leader, new));
        let rotated = keys.write_new(&APP_ROLES[..2], "during-switchover");
        let mut during = Vec::new();
        while !switchover.is_finished() {
            let mut sync = outside.command("sync", "read-write");
            sync.args(["--role", "temporaluser=postgres_temporal_pw"]);
            during.push(run(sync));
        }
        switchover.join().expect("the switchover");
        (rotated, during)
    });
    let codes: Vec<Option<i32>> = during.iter().map(Run::code).collect();
    eprintln!("switchover: one-shot syncs during it exited with {codes:?}");
    for out in &during {
        assert!(
            !out.stderr.contains("read-only") && !out.stderr.contains("recovery is in progress"),
            "{}",
            out.describe()
        );
    }
    (rotated, during)
}

/// How long a login stays valid once it is no longer published, in the overlap test:
/// longer than a failover and its checks, so that the grace runs across it.
const OVERLAP_GRACE: Duration = Duration::from_secs(15);

/// Overlap mode across a failover. The sidecars run with `--overlap`; `rotate` runs from
/// outside with every node in `PGHOST` and `PGTARGETSESSIONATTRS=read-write` (and
/// `--patroni on`: the superuser's file, which is Patroni's password, stays as it is). It
/// stages each role's twin, which the leader's sidecar creates and marks, and publishes it;
/// the leader's sidecar starts the retired login's grace. Then the leader dies. On the
/// new leader the twins, their mark, the published logins and the grace are the same
/// (replicated catalogs): the published logins work, the retired ones until their grace
/// ends and no longer after. A second rotation then finds the new leader past the dead
/// one.
#[test]
fn patroni_overlap_twins_published_login_and_grace_survive_a_failover() {
    let source = Source::generate();
    let mut secrets = Vec::new();
    remember(&source, &mut secrets);
    let mut cluster = PatroniCluster::start(3, &source.value("postgres_password.txt"));
    let old = cluster.leader().expect("a leader");
    create_roles(&cluster.nodes[old], &["appuser", "backupuser"]);
    let grace = format!("{}s", OVERLAP_GRACE.as_secs());
    let sidecars: Vec<Running> = cluster
        .nodes
        .iter()
        .map(|node| sidecar_at(node, &source.keys(), &["--overlap", "--grace", &grace]))
        .collect();
    for i in 0..3 {
        wait_until(LIMIT, "the published logins everywhere", || {
            published_work_on(&cluster.nodes[i], &source)
        });
    }
    let retired: Vec<(String, String)> = OVERLAPPED.map(|role| source.published(role)).into();
    let first = rotate_through_list(&cluster, &source, old);
    first.expect_stdout("the superuser's password");
    remember(&source, &mut secrets);
    assert_eq!(source.published("appuser").0, "appuser_alt");
    // The leader's sidecar starts the grace of the logins no longer published.
    wait_until(LIMIT, "the grace of the retired logins", || {
        cluster.nodes[old].psql(GRACE_DEADLINES).lines().count() == 2
    });
    let deadlines = cluster.nodes[old].psql(GRACE_DEADLINES);
    assert_eq!(cluster.nodes[old].psql(MARKED_TWINS), "2");
    let published_at = Instant::now();

    cluster.nodes[old].kill();
    let new = cluster.wait_leader(Some(old));
    let node = &cluster.nodes[new];
    eprintln!(
        "overlap: {} leads {:?} after the publish",
        node.name,
        published_at.elapsed()
    );
    assert_eq!(node.psql(MARKED_TWINS), "2", "the twins and their mark");
    assert_eq!(node.psql(GRACE_DEADLINES), deadlines, "the same grace");
    assert!(
        published_at.elapsed() < OVERLAP_GRACE,
        "the grace outlived the failover"
    );
    for (login, password) in &retired {
        node.login(login, password)
            .unwrap_or_else(|err| panic!("{login} inside its grace: {err}"));
    }
    assert!(published_work_on(node, &source));
    wait_until(OVERLAP_GRACE + LIMIT, "the grace to end", || {
        retired.iter().all(|(l, p)| node.login(l, p).is_err())
    });
    assert!(published_work_on(node, &source));

    // The next rotation re-keys the retired logins on the new leader, past the old one,
    // first in the list and down.
    let second = rotate_through_list(&cluster, &source, old);
    remember(&source, &mut secrets);
    assert_eq!(source.published("appuser").0, "appuser");
    assert!(published_work_on(node, &source));
    finish(&cluster, sidecars, vec![first, second], &secrets);
}

/// The roles overlap mode twins in these tests (`generate --overlap`'s default map).
const OVERLAPPED: [&str; 2] = ["appuser", "backupuser"];

/// The logins whose grace is running, and until when.
const GRACE_DEADLINES: &str = "SELECT rolname || ' ' || rolvaliduntil FROM pg_authid \
     WHERE rolname IN ('appuser', 'backupuser') AND rolvaliduntil IS NOT NULL \
     AND rolvaliduntil <> 'infinity' ORDER BY 1";

/// How many twins exist and carry the sync's mark.
const MARKED_TWINS: &str = "SELECT count(*) FROM pg_authid \
     WHERE rolname IN ('appuser_alt', 'backupuser_alt') \
     AND shobj_description(oid, 'pg_authid') LIKE 'pg-password-sync%'";

/// Adds the database passwords of `source` to `secrets` (the OIDC values are constants
/// other tests use too, and would be found in their processes).
fn remember(source: &Source, secrets: &mut Vec<String>) {
    for (name, value) in source.snapshot() {
        let value = String::from_utf8_lossy(&value).trim_end().to_owned();
        if name.starts_with("postgres_") && !secrets.contains(&value) {
            secrets.push(value);
        }
    }
}

/// Whether every overlapped role's published credential logs in on `node`.
fn published_work_on(node: &Node, source: &Source) -> bool {
    OVERLAPPED.iter().all(|role| {
        let (login, password) = source.published(role);
        node.login(&login, &password).is_ok()
    })
}

/// `rotate` from outside with every node in `PGHOST`, node `first` first, `read-write`,
/// and `--patroni on`.
fn rotate_through_list(cluster: &PatroniCluster, source: &Source, first: usize) -> Run {
    let (hosts, _) = cluster.host_list();
    let mut order: Vec<usize> = (0..cluster.nodes.len()).filter(|&i| i != first).collect();
    order.insert(0, first);
    let ports: Vec<String> = order
        .iter()
        .map(|&i| cluster.nodes[i].port.to_string())
        .collect();
    let ports = ports.join(",");
    let grace = format!("{}s", OVERLAP_GRACE.as_secs());
    let mut cmd = bin();
    cmd.arg("rotate")
        .arg("--dir")
        .arg(source.path())
        .args(["--pghost", &hosts, "--pgport", &ports])
        .args(["--target-session-attrs", "read-write", "--patroni", "on"])
        .args([
            "--wait",
            "10s",
            "--grace",
            &grace,
            "--connect-timeout",
            "10s",
        ]);
    run(cmd).expect_ok()
}

/// PgBouncer on the loopback in front of `cluster`, authenticating clients with SCRAM
/// against the server's own verifiers (`auth_query` through a SECURITY DEFINER function
/// that returns no verifier for a login whose VALID UNTIL has passed), as
/// docs/clusters.md configures it.
struct PgBouncer {
    dir: tempfile::TempDir,
    port: u16,
    child: std::process::Child,
}

impl PgBouncer {
    fn start(cluster: &Cluster) -> PgBouncer {
        let auth_password = unique("pgbouncer-auth");
        cluster.psql(&format!(
            "CREATE ROLE pgbouncer_auth LOGIN PASSWORD {};
             CREATE SCHEMA pgbouncer AUTHORIZATION postgres;
             CREATE FUNCTION pgbouncer.get_auth(p_usename text)
               RETURNS TABLE (username text, password text)
               LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
                 SELECT rolname::text,
                        CASE WHEN rolvaliduntil IS NULL OR rolvaliduntil > now()
                             THEN rolpassword END
                   FROM pg_authid
                  WHERE rolname = p_usename AND rolcanlogin AND NOT rolsuper $$;
             REVOKE ALL ON FUNCTION pgbouncer.get_auth(text) FROM PUBLIC;
             GRANT USAGE ON SCHEMA pgbouncer TO pgbouncer_auth;
             GRANT EXECUTE ON FUNCTION pgbouncer.get_auth(text) TO pgbouncer_auth;",
            quote_literal(&auth_password)
        ));
        let dir = server_dir("pps-pgbouncer-");
        let port = free_port();
        let users = dir.path().join("userlist.txt");
        write_as_server(&users, &format!("\"pgbouncer_auth\" \"{auth_password}\"\n"));
        std::fs::set_permissions(&users, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let ini = format!(
            "[databases]
postgres = host=127.0.0.1 port={server} dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {users}
auth_user = pgbouncer_auth
auth_query = SELECT username, password FROM pgbouncer.get_auth($1)
pool_mode = session
max_client_conn = 100
default_pool_size = 20
server_idle_timeout = 10
logfile = {log}
pidfile = {pid}
",
            server = cluster.port,
            users = users.display(),
            log = dir.path().join("pgbouncer.log").display(),
            pid = dir.path().join("pgbouncer.pid").display(),
        );
        let config = dir.path().join("pgbouncer.ini");
        write_as_server(&config, &ini);
        let program = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("pgbouncer");
        let child = as_server_user(program)
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting pgbouncer (scripts/test.sh installs it)");
        let bouncer = PgBouncer { dir, port, child };
        wait_until(LIMIT, "pgbouncer to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        cluster.clear_log();
        bouncer
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Points every role's section of `pg_service.conf` at PgBouncer (host, port, dbname),
/// as the applications' service file does behind a pooler; `rotate` keeps them.
fn through_pooler(source: &Source, port: u16) {
    let path = source.keys().join(SERVICE_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        out.push_str(line);
        out.push('\n');
        if line.starts_with('[') {
            out.push_str(&format!("host=127.0.0.1\nport={port}\ndbname=postgres\n"));
        }
    }
    let tmp = source.keys().join(".pg_service.conf.tmp");
    std::fs::write(&tmp, out).unwrap();
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

/// One login through libpq (`psql`) as `role`'s section of the service file says.
fn login_through_service(service_file: &std::path::Path, role: &str) -> Result<(), String> {
    let out = std::process::Command::new(pg_bin("psql"))
        .args(["-X", "-q", "-A", "-t", "-c", "SELECT current_user"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PGSERVICEFILE", service_file)
        .env("PGSERVICE", role)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    let who = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() && who == role {
        Ok(())
    } else {
        // psql's messages name logins, never passwords.
        Err(format!(
            "{role}: {who} {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A client fleet behind PgBouncer through overlap-mode rotations: four workers log in
/// without pause through the pooler, each with its role's section of `pg_service.conf`
/// (host and port: PgBouncer's), while `rotate` stages, waits for and publishes new
/// logins three times and the sync retires the old ones after their grace. No login
/// fails. PgBouncer takes each login's current SCRAM verifier from the server
/// (`auth_query`), so a staged login works through it as soon as the sync has set it, and
/// a retired one stops working once its grace has passed.
#[test]
fn pgbouncer_a_client_fleet_sees_no_failed_login_through_overlap_rotations() {
    let cluster = Cluster::start_default();
    create_app_roles(&cluster);
    let bouncer = PgBouncer::start(&cluster);
    let source = Source::generate();
    through_pooler(&source, bouncer.port);
    let state = tempfile::tempdir().unwrap();
    let mut watch = cluster.watch_command(&source.keys(), state.path());
    watch.args(["--overlap", "--grace", "4s"]);
    let watcher = Running::spawn(watch).with_server_log(&cluster.log);
    let service_file = source.keys().join(SERVICE_FILE);
    for (role, ..) in PAIRS {
        wait_until(LIMIT, "the published logins through the pooler", || {
            login_through_service(&service_file, role).is_ok()
        });
    }
    let fleet = Fleet::start(&service_file);
    let mut retired = Vec::new();
    for _ in 0..3 {
        retired = PAIRS
            .iter()
            .map(|(role, ..)| source.published(role))
            .collect();
        rotate_when_allowed(&source, cluster.port);
    }
    std::thread::sleep(Duration::from_millis(500));
    let (logins, failed, errors) = fleet.stop();
    eprintln!(
        "pgbouncer: {failed} failed of {} logins through the pooler over 3 rotations",
        logins.iter().sum::<u64>()
    );
    assert!(
        logins.iter().all(|&n| n >= 10),
        "a worker barely ran: {logins:?}"
    );
    assert_eq!(failed, 0, "{errors:?}");

    // A login retired by the last rotation stops working through the pooler once its
    // grace has passed: PgBouncer gets no verifier for it.
    let (login, password) = &retired[0];
    let probe = state.path().join("retired.conf");
    std::fs::write(
        &probe,
        format!(
            "[{}]\nhost=127.0.0.1\nport={}\ndbname=postgres\nuser={login}\npassword={password}\n",
            PAIRS[0].0, bouncer.port
        ),
    )
    .unwrap();
    wait_until(
        LIMIT,
        "the retired login to be refused through the pooler",
        || login_through_service(&probe, PAIRS[0].0).is_err(),
    );
    std::fs::remove_file(&probe).unwrap();
    watcher.signal(Signal::SIGTERM);
    let out = watcher.finish(LIMIT).expect_ok();
    let mut secrets = vec![password.clone()];
    remember(&source, &mut secrets);
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let logs = vec![
        ("server log".to_owned(), cluster.log_text()),
        ("pgbouncer's log".to_owned(), bouncer.log()),
    ];
    assert_no_leak_in(&secrets, logs, &[&out]);
}

/// Four workers logging in without pause through `service_file` (each with one role's
/// section, in turn), counting failures.
struct Fleet {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    failed: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    workers: Vec<std::thread::JoinHandle<u64>>,
}

impl Fleet {
    fn start(service_file: &std::path::Path) -> Fleet {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let failed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let workers = (0..4)
            .map(|i| {
                let (role, ..) = PAIRS[i % PAIRS.len()];
                let (stop, failed) = (stop.clone(), failed.clone());
                let service_file = service_file.to_path_buf();
                std::thread::spawn(move || {
                    let mut logins = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Err(err) = login_through_service(&service_file, role) {
                            failed.lock().unwrap().push(err);
                        }
                        logins += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    logins
                })
            })
            .collect();
        Fleet {
            stop,
            failed,
            workers,
        }
    }

    /// Stops the workers: the logins of each, the number of failures, their messages.
    fn stop(self) -> (Vec<u64>, u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let logins = self
            .workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .collect();
        let failed = self.failed.lock().unwrap().clone();
        (logins, failed.len() as u64, failed)
    }
}

/// Runs `rotate` until it is allowed (75: a login to re-key is still inside its grace).
fn rotate_when_allowed(source: &Source, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = run(rotate_cmd(source.path(), port, &["--wait", "30s"]));
        if out.code() == Some(0) {
            return;
        }
        assert_eq!(out.code(), Some(75), "{}", out.describe());
        assert!(Instant::now() < deadline, "{}", out.describe());
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The rule of Patroni's data directory on a plain server with its mark: the default role
/// map leaves the superuser alone, saying so once; `--patroni off` (the operator's
/// override) syncs it; so does a role map that names it, with a warning.
#[test]
fn a_data_directory_with_patronis_mark_leaves_the_superuser_unless_told_otherwise() {
    let cluster = Cluster::start_default();
    let keys = Keys::new();
    cluster.create_throwaway_roles(DEFAULT_ROLES.iter().map(|(role, _)| *role));
    let secrets = keys.write_new(&DEFAULT_ROLES, "patroni-rule");
    write_as_server(&cluster.data.join("patroni.dynamic.json"), "{}");
    let superuser = cluster.rolpassword("postgres");
    let sync = |extra: &[&str]| {
        let mut cmd = bin_for("sync", &cluster, &keys);
        cmd.args(extra);
        cluster.run(cmd).expect_ok()
    };
    let left = sync(&[]);
    left.expect_stdout_line(&["appuser", "changed"]);
    assert!(!left.stdout.contains("\"postgres\""), "{}", left.describe());
    assert_eq!(left.stderr.matches(LEFT_TO_PATRONI).count(), 1, "{left}");
    assert!(left.stderr.contains("patroni.dynamic.json"), "{left}");
    assert_eq!(cluster.rolpassword("postgres"), superuser);
    let off = sync(&["--patroni", "off"]);
    off.expect_stdout_line(&["postgres", "changed"]);
    cluster.assert_login("postgres", &secrets[0]);
    keys.write("postgres_password", &unique("mapped"));
    let mapped = sync(&["--role", "postgres=postgres_password"]);
    mapped.expect_stdout_line(&["postgres", "changed"]);
    assert!(mapped.stderr.contains("names the superuser"), "{mapped}");
    assert_no_leak(
        &secrets.iter().map(String::as_str).collect::<Vec<_>>(),
        Some(&cluster),
        &[&left, &off, &mapped],
    );
}

/// libpq's order past a server that is down: `sync` and `verify` with a host list whose
/// first server does not answer (nothing listens on its port) reach the second, the
/// `read-write` one, and verify says so.
#[test]
fn a_host_list_passes_over_a_server_that_is_down() {
    let cluster = Cluster::start_default();
    let keys = Keys::new();
    cluster.create_throwaway_roles(DEFAULT_ROLES.iter().map(|(role, _)| *role));
    let secrets = keys.write_new(&DEFAULT_ROLES, "host-list");
    // Over TCP the superuser logs in with its file's password.
    cluster.create_roles(&[("postgres", &secrets[0])]);
    cluster.clear_log();
    let ports = format!("{},{}", free_port(), cluster.port);
    let command = |sub: &str| {
        let mut cmd = bin();
        cmd.arg(sub)
            .args(["--pghost", "127.0.0.1,127.0.0.1", "--pgport", &ports])
            .args(["--target-session-attrs", "read-write"])
            .arg("--keys-dir")
            .arg(keys.path())
            .arg("--secrets-source-dir")
            .arg(keys.path().join("none"))
            .args(["--temporal-db-user", "temporaluser"]);
        cmd
    };
    let sync = cluster.run(command("sync")).expect_ok();
    sync.expect_stdout_line(&["appuser", "changed"]);
    cluster.assert_login("appuser", &secrets[1]);
    let mut verify = command("verify");
    verify.args(["--format", "json"]);
    let verify = cluster.run(verify).expect_ok();
    let at = format!("127.0.0.1:{}", cluster.port);
    assert_eq!(
        verify.stdout.matches(&at).count(),
        DEFAULT_ROLES.len(),
        "{verify}"
    );
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_leak(&secrets, Some(&cluster), &[&sync, &verify]);
}
