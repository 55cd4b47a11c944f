//! The client fleet: applications logging in without pause while secrets rotate, with the
//! new files reaching the database and the applications at different moments, as a
//! Kubernetes Secret mounted into two pods does.
//!
//! One source directory (`generate --overlap`, then `rotate`) is delivered to a "database
//! view" (watched by the sync) and an "app view" (read by the clients), each as a
//! Kubernetes-style `..data` swap, each after its own delay. Four workers log in over TCP
//! through libpq for the whole run (`psql` with `PGSERVICEFILE`/`PGSERVICE`, host and port
//! from the environment), re-reading `pg_service.conf` at every connection as any libpq
//! client does. In overlap mode (`watch --overlap`, grace longer than the largest delay)
//! no login may fail; the same fleet against single-login mode (`generate --force`, plain
//! `watch`) reports its failures for comparison and asserts nothing about them.
//!
//! The four delay pairs run at once, each with its own cluster, to keep the run short.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::k8s::SecretVolume;
use crate::common::source::*;
use crate::common::*;

/// (database view delay, app view delay) in milliseconds.
const DELAYS: [(u64, u64); 4] = [(0, 0), (0, 2000), (2000, 0), (1000, 3000)];
/// Rotations per delay pair in overlap mode, and in the single-login comparison.
const ROTATIONS: usize = 5;
const SINGLE_LOGIN_ROTATIONS: usize = 3;
/// Workers per delay pair, and the pause between one worker's logins: each pair's four
/// workers log in about a dozen times a second, a login every 80 ms or so, through every
/// rotation. (Every login is a psql process and a server backend: at 150 ms the fleet
/// alone kept a 2-core CI machine three-quarters busy for its minute and more, slowing
/// every test that ran beside it.)
const WORKERS: usize = 4;
const PAUSE: Duration = Duration::from_millis(300);
/// Longer than the largest delay difference (2 s) with room for a loaded machine, so an app
/// that still uses the previous login has switched before the server retires it.
const GRACE: &str = "6s";
/// How long the source must hold still before a delivery takes it.
const SETTLE: Duration = Duration::from_secs(1);

/// Copies every change of `source` into a Kubernetes-style Secret volume at `view`,
/// `delay` after it happened, in order: what the kubelet of one pod does.
struct Delivery {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Delivery {
    fn start(source: PathBuf, view: &Path, delay: Duration) -> Delivery {
        let mut volume = SecretVolume::new(view);
        let mut last = crate::common::source::snapshot(&source);
        update(&mut volume, &last);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut queue: VecDeque<(Instant, BTreeMap<String, Vec<u8>>)> = VecDeque::new();
            while !stopping.load(Ordering::Relaxed) {
                let now = crate::common::source::snapshot(&source);
                if now != last {
                    // A writer replaces several files one after another: deliver a state
                    // that held still for a moment, as a Secret update is one object
                    // (rotate's stage is one update, its publish the next).
                    std::thread::sleep(SETTLE);
                    if crate::common::source::snapshot(&source) == now {
                        queue.push_back((Instant::now() + delay, now.clone()));
                        last = now;
                    }
                }
                while queue.front().is_some_and(|(due, _)| *due <= Instant::now()) {
                    let (_, files) = queue.pop_front().unwrap();
                    update(&mut volume, &files);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Delivery {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn update(volume: &mut SecretVolume, files: &BTreeMap<String, Vec<u8>>) {
    let payload: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(name, bytes)| (name.as_str(), bytes.as_slice()))
        .collect();
    volume.update(&payload);
}

/// The workers' tally.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    first_errors: std::sync::Mutex<Vec<String>>,
}

/// `WORKERS` threads logging in through libpq until `stop`, alternating the two roles.
fn start_workers(
    port: u16,
    app_view: &Path,
    stop: &Arc<AtomicBool>,
    tally: &Arc<Tally>,
) -> Vec<std::thread::JoinHandle<u64>> {
    (0..WORKERS)
        .map(|i| {
            let role = PAIRS[i % PAIRS.len()].0;
            let service_file = app_view.join(SERVICE_FILE);
            let stop = stop.clone();
            let tally = tally.clone();
            std::thread::spawn(move || {
                let mut mine = 0;
                while !stop.load(Ordering::Relaxed) {
                    let out = std::process::Command::new(pg_bin("psql"))
                        .args(["-X", "-q", "-A", "-t", "-c", "SELECT current_user"])
                        .env_clear()
                        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                        .env("PGSERVICEFILE", &service_file)
                        .env("PGSERVICE", role)
                        .env("PGHOST", "127.0.0.1")
                        .env("PGPORT", port.to_string())
                        .env("PGDATABASE", "postgres")
                        .env("PGCONNECT_TIMEOUT", "10")
                        .output()
                        .unwrap();
                    let who = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                    if out.status.success() && who == role {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                        let mut errors = tally.first_errors.lock().unwrap();
                        if errors.len() < 5 {
                            // psql's messages name logins, never passwords.
                            errors.push(format!(
                                "{role}: {} {}",
                                who,
                                String::from_utf8_lossy(&out.stderr).trim()
                            ));
                        }
                    }
                    mine += 1;
                    std::thread::sleep(PAUSE);
                }
                mine
            })
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Overlap,
    SingleLogin,
}

/// What one fleet run saw.
struct Outcome {
    mode: Mode,
    delays: (u64, u64),
    rotations: usize,
    ok: u64,
    failed: u64,
    per_worker: Vec<u64>,
    first_errors: Vec<String>,
    elapsed: Duration,
}

/// The published credential of `source` works on `cluster` (polled).
fn wait_published_works(cluster: &Cluster, source: &Source) {
    for (role, ..) in PAIRS {
        let (user, password) = source.published(role);
        wait_until(
            Duration::from_secs(60),
            "the published login to work",
            || cluster.login(&user, &password).is_ok(),
        );
    }
}

/// Waits until `view` shows the source's current `pg_service.conf`.
fn wait_delivered(source: &Source, view: &Path) {
    let want = std::fs::read(source.keys().join(SERVICE_FILE)).unwrap();
    wait_until(
        Duration::from_secs(60),
        "the delivery of pg_service.conf",
        || std::fs::read(view.join(SERVICE_FILE)).ok().as_ref() == Some(&want),
    );
}

/// One fleet run: a cluster, a source, two views, the sync on the database view, the
/// workers, and the rotations of `mode`.
fn fleet(mode: Mode, delays: (u64, u64)) -> Outcome {
    let started = Instant::now();
    let cluster = Cluster::start_default();
    create_app_roles(&cluster);
    let source = Source::generate();
    let views = tempfile::tempdir().unwrap();
    let db_view = views.path().join("db");
    let app_view = views.path().join("app");
    let _to_db = Delivery::start(source.keys(), &db_view, Duration::from_millis(delays.0));
    let _to_app = Delivery::start(source.keys(), &app_view, Duration::from_millis(delays.1));

    let state = tempfile::tempdir().unwrap();
    let mut watch = cluster.watch_command(&db_view, state.path());
    if mode == Mode::Overlap {
        watch.args(["--overlap", "--grace", GRACE]);
    }
    let mut watcher = Running::spawn(watch);
    assert_still_running(&mut watcher);
    wait_published_works(&cluster, &source);

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let workers = start_workers(cluster.port, &app_view, &stop, &tally);
    let rotations = match mode {
        Mode::Overlap => ROTATIONS,
        Mode::SingleLogin => SINGLE_LOGIN_ROTATIONS,
    };
    for _ in 0..rotations {
        match mode {
            Mode::Overlap => rotate_when_allowed(&cluster, &source),
            Mode::SingleLogin => {
                run(generate_cmd(
                    source.path(),
                    &["--overlap", "--force", "--no-backup"],
                ))
                .expect_ok();
            }
        }
        // Both views have the result and the server accepts it before the next one.
        wait_delivered(&source, &db_view);
        wait_delivered(&source, &app_view);
        wait_published_works(&cluster, &source);
    }
    // The workers log in a little longer on the final state.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let per_worker: Vec<u64> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let first_errors = tally.first_errors.lock().unwrap().clone();
    Outcome {
        mode,
        delays,
        rotations,
        ok: tally.ok.load(Ordering::Relaxed),
        failed: tally.failed.load(Ordering::Relaxed),
        per_worker,
        first_errors,
        elapsed: started.elapsed(),
    }
}

/// Runs `rotate` until it is allowed (it refuses while the login to re-key is inside its
/// grace period or the server has not seen the last publish yet).
fn rotate_when_allowed(cluster: &Cluster, source: &Source) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let done = run(rotate_cmd(source.path(), cluster.port, &["--wait", "60s"]));
        if done.code() == Some(0) {
            return;
        }
        // 75: refused for now (a login to re-key is still in its grace period, or the
        // server has not seen the last publish yet); every other failure is one.
        let waiting = done.code() == Some(75);
        assert!(waiting, "rotate failed\n{}", done.describe());
        assert!(
            Instant::now() < deadline,
            "rotate still refused after 90 s\n{}",
            done.describe()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Prints one run's figures; with `PG_PASSWORD_SYNC_FLEET_REPORT=FILE` (set by
/// `scripts/bench.sh`) also appends them to FILE as one JSON line.
fn report(outcome: &Outcome) {
    if let Some(path) = std::env::var_os("PG_PASSWORD_SYNC_FLEET_REPORT") {
        use std::io::Write as _;
        let mode = match outcome.mode {
            Mode::Overlap => "overlap",
            Mode::SingleLogin => "single_login",
        };
        let line = format!(
            "{{\"mode\": \"{mode}\", \"db_delay_ms\": {}, \"app_delay_ms\": {}, \
             \"rotations\": {}, \"logins\": {}, \"failed\": {}}}\n",
            outcome.delays.0,
            outcome.delays.1,
            outcome.rotations,
            outcome.ok + outcome.failed,
            outcome.failed
        );
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut file| file.write_all(line.as_bytes()))
            .expect("appending to PG_PASSWORD_SYNC_FLEET_REPORT");
    }
    eprintln!(
        "fleet {:?} db +{} ms / app +{} ms: {} failed of {} logins over {} rotations \
         ({:.1} per rotation; workers {:?}; {:.0} s){}",
        outcome.mode,
        outcome.delays.0,
        outcome.delays.1,
        outcome.failed,
        outcome.ok + outcome.failed,
        outcome.rotations,
        outcome.failed as f64 / outcome.rotations as f64,
        outcome.per_worker,
        outcome.elapsed.as_secs_f64(),
        if outcome.first_errors.is_empty() {
            String::new()
        } else {
            format!("; first errors: {:?}", outcome.first_errors)
        }
    );
}

#[test]
fn a_client_fleet_sees_no_failed_login_through_overlap_rotations() {
    let runs: Vec<std::thread::JoinHandle<(Outcome, Outcome)>> = DELAYS
        .iter()
        .map(|&delays| {
            std::thread::spawn(move || {
                let overlap = fleet(Mode::Overlap, delays);
                let single = fleet(Mode::SingleLogin, delays);
                (overlap, single)
            })
        })
        .collect();
    let outcomes: Vec<(Outcome, Outcome)> = runs
        .into_iter()
        .map(|r| r.join().expect("a fleet run panicked"))
        .collect();
    for (overlap, single) in &outcomes {
        report(overlap);
        report(single);
    }
    for (overlap, _) in &outcomes {
        assert!(
            overlap.per_worker.iter().all(|&n| n >= 10),
            "a worker barely ran: {:?}",
            overlap.per_worker
        );
        assert_eq!(
            overlap.failed, 0,
            "failed logins in overlap mode with delays {:?}: {:?}",
            overlap.delays, overlap.first_errors
        );
    }
}
