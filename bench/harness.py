#!/usr/bin/env python3
"""Measuring helpers for scripts/bench.sh: every clock here is time.monotonic().

Subcommands (each prints one JSON object on stdout, diagnostics on stderr):

  life     start CMD as PID 1 of a new PID namespace (unshare --pid --fork --mount-proc),
           time the first successful TCP login with a password file, sample the steady
           VmRSS and thread count of that PID 1, optionally run Kubernetes-style `..data` rotations and time
           each one to the first login with the new password, then stop it with a signal
           (SIGKILL after a grace period, like `docker stop`) and read the cluster state
           with pg_controldata.
  time     run CMD and report its wall time.
  login    one login attempt (exit 0 on success).
  meta     write the run's settings and machine (KEY=VALUE arguments) as meta.json.
  summary  turn the collected JSON lines into summary.json and a markdown table.

Passwords are read from files and handed to pg8000 in memory; they never reach argv.
"""

import argparse
import ctypes
import json
import math
import os
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time

import pg8000.native

PR_SET_PDEATHSIG = 1


def log(msg):
    print(f"[harness] {msg}", file=sys.stderr, flush=True)


def read_secret(path):
    with open(path, encoding="utf-8") as f:
        return f.read().rstrip("\r\n")


def try_login(port, user, password, timeout=2.0):
    """One login over TCP; True on success, False on refusal or authentication failure."""
    try:
        conn = pg8000.native.Connection(
            user, host="127.0.0.1", port=port, password=password,
            database="postgres", timeout=timeout,
            # No TLS: pg8000 would build a default SSL context (loading the system CA
            # store, ~40 ms) on every attempt, which would swamp what we measure.
            ssl_context=False)
    except (pg8000.native.InterfaceError, pg8000.native.DatabaseError, OSError):
        return False
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing a working connection must not fail the poll
        pass
    return True


class Poll:
    """Outcome of poll_login: when the first login succeeded, and how long one (the
    successful) attempt took: the poller's own share of a measured latency."""
    t_ok = None
    attempt_ms = None


def poll_login(port, user, password, deadline, interval, alive=None):
    """Poll until a login succeeds (one attempt at a time, `interval` apart)."""
    poll = Poll()
    while time.monotonic() < deadline:
        t_try = time.monotonic()
        if try_login(port, user, password):
            poll.t_ok = time.monotonic()
            poll.attempt_ms = round((poll.t_ok - t_try) * 1000, 2)
            return poll
        if alive is not None and not alive():
            return poll
        time.sleep(interval)
    return poll


def children_of(ppid):
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == ppid:
            out.append(int(entry))
    return out


def proc_status(pid):
    """VmRSS and its split (anon/file/shmem, KiB) and the thread count of pid."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
                out[key] = int(value.split()[0])
    return out


def vmrss_kib(pid):
    return proc_status(pid)["VmRSS"]


# Log lines whose arrival time explains where the time goes.
MARKS = {
    "pg_ready": "database system is ready to accept connections",
    "synced": "Password synchronization complete.",
    # The watcher's line after a live re-sync.
    "rotated": "passwords rotated:",
}


class LogTap:
    """Copies the PID 1's combined output to the log file, each line prefixed with the ms
    since t0, and keeps the monotonic arrival time of the lines in MARKS."""

    def __init__(self, stream, path, t0):
        self.stream, self.t0, self.events = stream, t0, []
        self.file = open(path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        for raw in self.stream:
            t = time.monotonic()
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.file.write(f"+{(t - self.t0) * 1000:9.1f}ms {line}\n")
            self.file.flush()
            for mark, text in MARKS.items():
                if text in line:
                    self.events.append((mark, t))

    def first(self, mark, after=0.0):
        for m, t in list(self.events):
            if m == mark and t >= after:
                return t
        return None

    def close(self):
        self.thread.join(timeout=5)
        self.file.close()


def cluster_state(pgdata, bindir):
    out = subprocess.run([os.path.join(bindir, "pg_controldata"), "-D", pgdata],
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, LC_ALL="C")).stdout
    for line in out.splitlines():
        if line.startswith("Database cluster state:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def child_setup():
    """Child side of Popen: die with the harness, so nothing outlives an interrupted bench."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # A background job of a non-interactive shell (the bench runs us so) starts with SIGINT
    # and SIGQUIT ignored; the PID 1 under test must start with default dispositions.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def k8s_rotate(keys_dir, names, new_values):
    """One Kubernetes-style secret update: write a new `..<ts>` dir holding every file,
    symlink `..data_tmp` to it, rename it over `..data`, remove the old dir. Returns the
    monotonic time of the rename (the instant the new secret becomes visible)."""
    old = os.readlink(os.path.join(keys_dir, "..data"))
    new = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{secrets.token_hex(4)}"
    new_path = os.path.join(keys_dir, new)
    os.mkdir(new_path, 0o755)
    for name in names:
        if name in new_values:
            value = new_values[name]
        else:
            value = read_secret(os.path.join(keys_dir, old, name))
        fd = os.open(os.path.join(new_path, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(value + "\n")
    tmp = os.path.join(keys_dir, "..data_tmp")
    os.symlink(new, tmp)
    t_swap = time.monotonic()
    os.rename(tmp, os.path.join(keys_dir, "..data"))
    old_path = os.path.join(keys_dir, old)
    for name in os.listdir(old_path):
        os.unlink(os.path.join(old_path, name))
    os.rmdir(old_path)
    return t_swap


def rename_rotate(keys_dir, name, value):
    """One rotation of a plain file the way a generator or an editor does it: write a temp
    file beside it, rename it over the old one. Returns the monotonic time of the rename."""
    tmp = os.path.join(keys_dir, f".{name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value + "\n")
    t_swap = time.monotonic()
    os.rename(tmp, os.path.join(keys_dir, name))
    return t_swap


def scrape(port):
    """One GET /metrics on the loopback; the body's size in bytes."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET /metrics answered {response.status}")
        return len(body)
    finally:
        conn.close()


def cmd_life(a):
    result = {"label": a.label}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *a.cmd],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=child_setup)
    tap = LogTap(proc.stdout, a.log, t0)
    pid1 = None
    try:
        # The namespace's PID 1 is unshare's only child.
        find_deadline = time.monotonic() + 5
        while pid1 is None and time.monotonic() < find_deadline:
            kids = children_of(proc.pid)
            if kids:
                pid1 = kids[0]
            elif proc.poll() is not None:
                break
            else:
                time.sleep(0.001)
        if pid1 is None:
            if proc.poll() is not None:
                raise RuntimeError(f"PID 1 exited at once (unshare status {proc.returncode})")
            raise RuntimeError("PID 1 of the new namespace never appeared")

        password = read_secret(a.password_file)
        poll = poll_login(a.port, a.user, password, t0 + a.timeout, a.interval,
                          alive=lambda: proc.poll() is None)
        t_login = poll.t_ok
        if t_login is None:
            raise RuntimeError(
                f"no login as {a.user} with the new password within {a.timeout}s "
                f"(PID 1 {'exited ' + str(proc.returncode) if proc.poll() is not None else 'still running'})")
        result["synced_ms"] = round((t_login - t0) * 1000, 1)
        result["login_attempt_ms"] = poll.attempt_ms
        # Where the time went, from the log lines' arrival: postgres ready, sync logged.
        time.sleep(0.05)
        for mark in MARKS:
            t = tap.first(mark)
            result[f"{mark}_logged_ms"] = None if t is None else round((t - t0) * 1000, 1)

        if a.scrape_port:
            # The listener's code is resident only once it has served: scrape as Prometheus
            # would before the RSS is sampled.
            result["scrape_bytes"] = [scrape(a.scrape_port) for _ in range(3)]

        # Steady RSS: let the post-sync work settle, then take the median of a few samples.
        time.sleep(a.settle)
        samples = []
        for _ in range(5):
            samples.append(vmrss_kib(pid1))
            time.sleep(0.1)
        result["rss_kib"] = int(statistics.median(samples))
        result["status"] = proc_status(pid1)
        # Where that RSS lives, mapping by mapping (binary, libc, heap, stacks), for whoever
        # works on the number: kept beside the PID 1 log.
        with open(f"/proc/{pid1}/smaps", encoding="utf-8") as src, \
                open(a.log + ".smaps", "w", encoding="utf-8") as dst:
            dst.write(src.read())

        if a.rotations:
            (result["rotation_ms"], result["rotation_sync_logged_ms"],
             result["rotation_login_attempt_ms"]) = rotate_many(a, proc, tap)

        if a.stop_signal == "KILL":
            # Not a stop measurement: just end this run (a baseline run beyond the few whose
            # ten-second `docker stop` is timed).
            os.kill(pid1, signal.SIGKILL)
            proc.wait(timeout=30)
        elif a.stop_signal:
            sig = getattr(signal, "SIG" + a.stop_signal)
            t_stop = time.monotonic()
            os.kill(pid1, sig)
            try:
                proc.wait(timeout=a.grace)
                result["killed"] = False
            except subprocess.TimeoutExpired:
                os.kill(pid1, signal.SIGKILL)
                proc.wait(timeout=30)
                result["killed"] = True
            result["stop_ms"] = round((time.monotonic() - t_stop) * 1000, 1)
            result["exit_status"] = proc.returncode
            result["state"] = cluster_state(a.pgdata, a.bindir)
            result["clean"] = result["state"] == "shut down" and not result["killed"]
    except Exception as e:  # noqa: BLE001 - reported as the scenario's outcome
        result["error"] = str(e)
        log(f"{a.label}: {e}")
    finally:
        if proc.poll() is None:
            if pid1 is not None:
                try:
                    os.kill(pid1, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait(timeout=30)
        tap.close()
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


def rotate_many(a, proc, tap):
    names = a.rotate_names.split(",")
    samples, logged, attempts = [], [], []
    for i in range(a.rotations):
        new_password = f"bench-rot-{i}-{secrets.token_hex(12)}"
        if a.rotation_layout == "k8s":
            t_swap = k8s_rotate(a.keys_dir, names, {a.rotate_file: new_password})
        else:
            t_swap = rename_rotate(a.keys_dir, a.rotate_file, new_password)
        poll = poll_login(a.port, a.user, new_password, t_swap + a.rotation_timeout,
                          a.rotation_interval, alive=lambda: proc.poll() is None)
        t_ok = poll.t_ok
        attempts.append(poll.attempt_ms)
        if t_ok is None:
            raise RuntimeError(f"rotation {i}: new password not accepted within "
                               f"{a.rotation_timeout}s")
        samples.append(round((t_ok - t_swap) * 1000, 2))
        # Independent rotations: let the watcher go quiet before the next swap.
        time.sleep(a.rotation_gap)
        t_log = tap.first("rotated", after=t_swap) or tap.first("synced", after=t_swap)
        logged.append(None if t_log is None else round((t_log - t_swap) * 1000, 2))
    return samples, logged, attempts


def cmd_time(a):
    t0 = time.monotonic()
    rc = subprocess.run(a.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        check=False).returncode
    ms = round((time.monotonic() - t0) * 1000, 1)
    print(json.dumps({"label": a.label, "ms": ms, "rc": rc}), flush=True)
    return rc


def cmd_login(a):
    return 0 if try_login(a.port, a.user, read_secret(a.password_file)) else 1


def cmd_meta(a):
    meta = {}
    for field in a.fields:
        key, sep, value = field.partition("=")
        if not sep or not key:
            raise SystemExit(f"meta: expected KEY=VALUE, got {field!r}")
        meta[key] = int(value) if value.isdigit() else value
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return 0


# ---------------------------------------------------------------------------- summary

def load(path):
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return rows


def med(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


def pct(values, p):
    """Nearest-rank percentile: p99 of 50 samples is the largest one, p50 the 25th."""
    if not values:
        return None
    s = sorted(values)
    return round(s[max(0, math.ceil(p / 100 * len(s)) - 1)], 1)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def fmt(v, unit=""):
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return f"{v}{unit}"


def fleet_summary(rows):
    """Failed logins per rotation of the client fleet, per mode and delay pair."""
    out = []
    for r in rows:
        out.append({"mode": r["mode"], "db_delay_ms": r["db_delay_ms"],
                    "app_delay_ms": r["app_delay_ms"], "rotations": r["rotations"],
                    "logins": r["logins"], "failed": r["failed"],
                    "failed_per_rotation": (round(r["failed"] / r["rotations"], 1)
                                            if r["rotations"] else None)})
    return out


def fleet_lines(fleet):
    """The markdown table of `fleet_summary`, empty when the fleet did not run."""
    if not fleet:
        return []
    lines = ["", "Client fleet (4 workers through libpq and PGSERVICEFILE, tests/fleet.rs): "
             "failed logins per rotation when the database and the applications see a "
             "rotation at different moments.", "",
             "| delivery delay (database / app) | overlap mode | single-login mode |",
             "|---|---|---|"]
    pairs = sorted({(r["db_delay_ms"], r["app_delay_ms"]) for r in fleet})
    for db, app in pairs:
        cells = []
        for mode in ("overlap", "single_login"):
            r = next((r for r in fleet if r["mode"] == mode and r["db_delay_ms"] == db
                      and r["app_delay_ms"] == app), None)
            cells.append("—" if r is None else
                         f"{fmt(r['failed_per_rotation'])} ({r['failed']} of {r['logins']} "
                         f"logins, {r['rotations']} rotations)")
        lines.append(f"| {db / 1000:g} s / {app / 1000:g} s | {cells[0]} | {cells[1]} |")
    return lines


def cmd_summary(a):
    d = a.dir
    ours = [r for r in load(f"{d}/startup.jsonl") if r["label"] == "ours"]
    ours_metrics = [r for r in load(f"{d}/startup.jsonl") if r["label"] == "ours_metrics"]
    base = [r for r in load(f"{d}/startup.jsonl") if r["label"] == "baseline"]
    tini = load(f"{d}/tini.jsonl")
    rot = load(f"{d}/rotation.jsonl")
    rot_rename = load(f"{d}/rotation_rename.jsonl")
    roles = load(f"{d}/roles.jsonl")
    meta = json.load(open(f"{d}/meta.json", encoding="utf-8"))

    def ok(rows):
        return [r for r in rows if "error" not in r]

    errors = [f"{r['label']}: {r['error']}"
              for r in ours + ours_metrics + base + tini + rot + rot_rename if "error" in r]

    rot_samples = [x for r in ok(rot) for x in r.get("rotation_ms", [])]
    rot_rename_samples = [x for r in ok(rot_rename) for x in r.get("rotation_ms", [])]
    rot_rename_logged = [x for r in ok(rot_rename)
                         for x in r.get("rotation_sync_logged_ms", []) if x is not None]
    ours_stop = [r for r in ok(ours) if "stop_ms" in r]
    base_stop = [r for r in ok(base) if "stop_ms" in r]
    roles_ours = [r["ms"] for r in roles if r["label"] == "ours" and r["rc"] == 0]
    roles_psql = [r["ms"] for r in roles if r["label"] == "psql_batch" and r["rc"] == 0]

    summary = {
        "startup_synced_ms": {"ours": med([r["synced_ms"] for r in ok(ours)]),
                              "baseline": med([r["synced_ms"] for r in ok(base)])},
        "rotation_ms": {"p50": pct(rot_samples, 50), "p99": pct(rot_samples, 99),
                        "n": len(rot_samples)},
        "stop": {"ours_ms": med([r["stop_ms"] for r in ours_stop]),
                 "ours_clean": (all(r["clean"] for r in ours_stop) if ours_stop else None),
                 "baseline_ms": med([r["stop_ms"] for r in base_stop]),
                 "baseline_clean": (all(r["clean"] for r in base_stop) if base_stop else None)},
        "rss_kib": {"ours": med([r["rss_kib"] for r in ok(ours)]),
                    "ours_metrics": med([r["rss_kib"] for r in ok(ours_metrics)]),
                    "tini": med([r["rss_kib"] for r in ok(tini)]),
                    "baseline": med([r["rss_kib"] for r in ok(base)])},
        "pid1_threads": {k: med([r["status"].get("Threads") for r in ok(rows) if "status" in r])
                         for k, rows in (("ours", ours), ("ours_metrics", ours_metrics),
                                         ("tini", tini), ("baseline", base))},
        "binary_bytes": meta.get("binary_bytes"),
        "roles_1000_ms": {"ours": med(roles_ours), "psql_batch": med(roles_psql)},
    }
    s = summary
    targets = [
        ("synced ≥ 5× sooner than the baseline",
         None if None in (s["startup_synced_ms"]["ours"], s["startup_synced_ms"]["baseline"])
         else s["startup_synced_ms"]["baseline"] >= 5 * s["startup_synced_ms"]["ours"]),
        ("rotation p99 ≤ 50 ms",
         None if s["rotation_ms"]["p99"] is None else s["rotation_ms"]["p99"] <= 50),
        ("clean stop in ≤ 1 s",
         None if s["stop"]["ours_ms"] is None
         else bool(s["stop"]["ours_clean"]) and max(r["stop_ms"] for r in ours_stop) <= 1000),
        ("plain rename: event → watcher's commit p99 ≤ 50 ms",
         None if not rot_rename_logged else pct(rot_rename_logged, 99) <= 50),
        ("PID 1 RSS ≤ the baseline's (bash)",
         None if None in (s["rss_kib"]["ours"], s["rss_kib"]["baseline"])
         else s["rss_kib"]["ours"] <= s["rss_kib"]["baseline"]),
        ("stripped binary ≤ 3 MiB",
         None if s["binary_bytes"] is None else s["binary_bytes"] <= 3 * 1024 * 1024),
        ("1,000 roles within 1.5× of the psql batch",
         None if None in (s["roles_1000_ms"]["ours"], s["roles_1000_ms"]["psql_batch"])
         else s["roles_1000_ms"]["ours"] <= 1.5 * s["roles_1000_ms"]["psql_batch"]),
    ]
    rot_logged = [x for r in ok(rot) for x in r.get("rotation_sync_logged_ms", []) if x is not None]
    breakdown = {
        "ours_postgres_ready_logged_ms": med([r.get("pg_ready_logged_ms") for r in ok(ours)]),
        "ours_sync_logged_ms": med([r.get("synced_logged_ms") for r in ok(ours)]),
        "baseline_postgres_ready_logged_ms": med([r.get("pg_ready_logged_ms") for r in ok(base)]),
        "baseline_runs_waiting_a_second_poll": sum(r["synced_ms"] >= 1000 for r in ok(base)),
        "baseline_runs": len(ok(base)),
        "startup_login_attempt_ms": med([r.get("login_attempt_ms") for r in ok(ours + base)]),
        "rotation_commit_logged_ms": {"p50": pct(rot_logged, 50), "p99": pct(rot_logged, 99),
                                      "n": len(rot_logged)},
        "rotation_rename_commit_logged_ms": {"p50": pct(rot_rename_logged, 50),
                                             "p99": pct(rot_rename_logged, 99),
                                             "n": len(rot_rename_logged)},
        "rotation_login_attempt_ms": med([x for r in ok(rot)
                                          for x in r.get("rotation_login_attempt_ms", [])]),
        "rss_anon_kib": {k: med([r["status"].get("RssAnon") for r in ok(rows) if "status" in r])
                         for k, rows in (("ours", ours), ("ours_metrics", ours_metrics),
                                         ("tini", tini), ("baseline", base))},
    }
    summary_file = dict(summary)
    summary_file["meta"] = dict(meta, errors=errors, breakdown=breakdown,
                                rotation_rename_ms={
                                    "p50": pct(rot_rename_samples, 50),
                                    "p99": pct(rot_rename_samples, 99),
                                    "n": len(rot_rename_samples)},
                                targets={name: met for name, met in targets})
    summary_file["fleet_failed_logins"] = fleet_summary(load(f"{d}/fleet.jsonl"))
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(summary_file, f, indent=2)
        f.write("\n")

    m = meta
    st, stp, rss, r1k = (s["startup_synced_ms"], s["stop"], s["rss_kib"], s["roles_1000_ms"])
    rd = summary_file["meta"]["rotation_rename_ms"]
    threads = s["pid1_threads"]
    lines = [
        f"Machine: {m['nproc']} CPU ({m['cpu']}), kernel {m['kernel']}, {m['postgres']}; "
        f"mode: {m['mode']}; medians of {m['startup_reps']} interleaved starts each "
        f"(the baseline's stop timed in {m['baseline_stop_reps']} of them); "
        f"watcher debounce {m['debounce']}.",
        "",
        "| metric | ours | baseline | baseline ÷ ours (> 1: ours better) |",
        "|---|---|---|---|",
        f"| start → first login with the new password (median) | {fmt(st['ours'], ' ms')} | "
        f"{fmt(st['baseline'], ' ms')} | {fmt(ratio(st['baseline'], st['ours']), '×')} |",
        f"| … of which postgres logged ready / sync logged (medians) | "
        f"{fmt(breakdown['ours_postgres_ready_logged_ms'], ' ms')} / "
        f"{fmt(breakdown['ours_sync_logged_ms'], ' ms')} | "
        f"{fmt(breakdown['baseline_postgres_ready_logged_ms'], ' ms')} / — "
        f"({breakdown['baseline_runs_waiting_a_second_poll']} of {breakdown['baseline_runs']} "
        f"runs waited for a second `pg_isready`) | — |",
        f"| rotation: Kubernetes `..data` swap → login (p50 / p99, n={s['rotation_ms']['n']}) | "
        f"{fmt(s['rotation_ms']['p50'], ' ms')} / {fmt(s['rotation_ms']['p99'], ' ms')} | "
        f"needs a restart / redeploy (not measured: minutes) | — |",
        f"| … of which swap → watcher's commit logged (p50 / p99) | "
        f"{fmt(breakdown['rotation_commit_logged_ms']['p50'], ' ms')} / "
        f"{fmt(breakdown['rotation_commit_logged_ms']['p99'], ' ms')} | — | — |",
        f"| rotation: plain file renamed over (generator, editor) → login (p50 / p99, n={rd['n']}) | "
        f"{fmt(rd['p50'], ' ms')} / {fmt(rd['p99'], ' ms')} | — | — |",
        f"| … of which rename → watcher's commit logged (p50 / p99) | "
        f"{fmt(breakdown['rotation_rename_commit_logged_ms']['p50'], ' ms')} / "
        f"{fmt(breakdown['rotation_rename_commit_logged_ms']['p99'], ' ms')} | — | — |",
        f"| stop: ours SIGINT, baseline `docker stop` (SIGTERM, SIGKILL after {m['grace_s']} s) | "
        f"{fmt(stp['ours_ms'], ' ms')} | {fmt(stp['baseline_ms'], ' ms')} | "
        f"{fmt(ratio(stp['baseline_ms'], stp['ours_ms']), '×')} |",
        f"| cluster state after stop (clean = `shut down`) | "
        f"{'clean' if stp['ours_clean'] else ('n/a' if stp['ours_clean'] is None else 'NOT clean')} | "
        f"{'clean' if stp['baseline_clean'] else ('n/a' if stp['baseline_clean'] is None else 'NOT clean (crash recovery next start)')} | — |",
        f"| PID 1 VmRSS, steady after sync (tini: {fmt(rss['tini'], ' KiB')}) | "
        f"{fmt(rss['ours'], ' KiB')} | {fmt(rss['baseline'], ' KiB')} (bash) | "
        f"{fmt(ratio(rss['baseline'], rss['ours']), '×')} |",
        f"| … of which anonymous (private) memory | {fmt(breakdown['rss_anon_kib']['ours'], ' KiB')} | "
        f"{fmt(breakdown['rss_anon_kib']['baseline'], ' KiB')} | — |",
        f"| PID 1 VmRSS with `--metrics-listen`, after 3 scrapes (anonymous: "
        f"{fmt(breakdown['rss_anon_kib']['ours_metrics'], ' KiB')}; threads: "
        f"{fmt(threads['ours_metrics'])}) | {fmt(rss['ours_metrics'], ' KiB')} | "
        f"{fmt(rss['baseline'], ' KiB')} (bash) | "
        f"{fmt(ratio(rss['baseline'], rss['ours_metrics']), '×')} |",
        f"| PID 1 threads, steady after sync (tini: {fmt(threads['tini'])}) | "
        f"{fmt(threads['ours'])} | {fmt(threads['baseline'])} (bash) | — |",
        f"| stripped release binary | {fmt(s['binary_bytes'], ' B')} | — | — |",
        f"| 1,000 roles rotated (ours: one `sync`; baseline: one psql batch of plaintext ALTER ROLE) | "
        f"{fmt(r1k['ours'], ' ms')} | {fmt(r1k['psql_batch'], ' ms')} | "
        f"{fmt(ratio(r1k['psql_batch'], r1k['ours']), '×')} |",
        "",
        f"Login poller: one attempt at a time, {m['startup_poll_interval_ms']} ms apart at startup, "
        f"{m['rotation_poll_interval_ms']} ms apart during rotations; a successful attempt took "
        f"{fmt(breakdown['startup_login_attempt_ms'], ' ms')} (startup) / "
        f"{fmt(breakdown['rotation_login_attempt_ms'], ' ms')} (rotation), medians — "
        "that much of each latency is the poller's own.",
        "",
        "| target | met |",
        "|---|---|",
    ]
    lines += [f"| {name} | {'not measured' if met is None else ('yes' if met else 'NO')} |"
              for name, met in targets]
    lines += fleet_lines(summary_file["fleet_failed_logins"])
    if errors:
        lines += ["", "Errors (scenarios that produced no number):"]
        lines += [f"- {e}" for e in errors]
    print("\n".join(lines))
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    life = sub.add_parser("life")
    life.add_argument("--label", required=True)
    life.add_argument("--port", type=int, required=True)
    life.add_argument("--user", required=True)
    life.add_argument("--password-file", required=True)
    life.add_argument("--pgdata", required=True)
    life.add_argument("--bindir", required=True)
    life.add_argument("--log", required=True)
    life.add_argument("--timeout", type=float, default=90.0)
    life.add_argument("--interval", type=float, default=0.005)
    life.add_argument("--settle", type=float, default=1.0)
    life.add_argument("--stop-signal", choices=["INT", "TERM", "QUIT", "KILL"])
    life.add_argument("--grace", type=float, default=10.0)
    life.add_argument("--rotations", type=int, default=0)
    life.add_argument("--keys-dir")
    life.add_argument("--rotate-file")
    life.add_argument("--rotation-layout", choices=["k8s", "plain"], default="k8s")
    life.add_argument("--rotate-names", default="")
    life.add_argument("--rotation-timeout", type=float, default=10.0)
    life.add_argument("--rotation-interval", type=float, default=0.005)
    life.add_argument("--rotation-gap", type=float, default=0.3)
    life.add_argument("--scrape-port", type=int,
                      help="GET 127.0.0.1:PORT/metrics three times before the RSS samples")
    life.add_argument("cmd", nargs=argparse.REMAINDER)

    tm = sub.add_parser("time")
    tm.add_argument("--label", required=True)
    tm.add_argument("cmd", nargs=argparse.REMAINDER)

    lg = sub.add_parser("login")
    lg.add_argument("--port", type=int, required=True)
    lg.add_argument("--user", required=True)
    lg.add_argument("--password-file", required=True)

    sm = sub.add_parser("summary")
    sm.add_argument("--dir", required=True)
    sm.add_argument("--out", required=True)

    mt = sub.add_parser("meta")
    mt.add_argument("--out", required=True)
    mt.add_argument("fields", nargs="*", metavar="KEY=VALUE",
                    help="a setting or fact of the run; digits are stored as a number")

    a = p.parse_args()
    if getattr(a, "cmd", None) and a.cmd[0] == "--":
        a.cmd = a.cmd[1:]
    return {"life": cmd_life, "time": cmd_time, "login": cmd_login, "meta": cmd_meta,
            "summary": cmd_summary}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
