//! Child processes that never outlive the test binary: spawning with a
//! parent-death signal, signals by pid, the postgres OS user, log tails, and
//! removal of the shared servers' folders at exit.
//!
//! Owns every `unsafe` of the harness (prctl, kill, geteuid: a few libc calls
//! with plain integer arguments). Must never signal a process it did not
//! start.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// Spawns `cmd` so that the kernel SIGKILLs the child when the test binary
/// exits, however it exits (a static's `Drop` never runs, a panic may abort,
/// the runner may be killed).
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends, not
/// the process: libtest runs each test on its own thread, so a shared server
/// started from one test would die with that test. Every spawn therefore
/// goes through one thread that lives as long as the process.
pub fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    die_with_parent(&mut cmd);
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send((cmd, reply_tx))
        .expect("harness spawner thread is gone");
    reply_rx
        .recv()
        .expect("harness spawner thread dropped a request")
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("harness-spawner".into())
            .spawn(move || {
                // The sender lives in a static, so this loop ends only with the
                // process, and with it the children's parent-death signal.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the harness spawner thread");
        Mutex::new(tx)
    })
}

#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: getpid is always safe to call.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and calls only prctl and
    // getppid, which are async-signal-safe and allocate nothing. std runs it
    // after setuid/setgid, which matters: a credential change clears the
    // parent-death signal.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(io::Error::other("the test binary exited while spawning"));
            }
            Ok(())
        });
    }
}

/// Sends `signal` (`libc::SIGTERM`, ...) to `pid`, a process this harness
/// started. A process that is already gone is not an error.
#[allow(unsafe_code)]
pub fn signal(pid: u32, signal: i32) {
    let pid = libc::pid_t::try_from(pid).expect("pid out of range");
    assert!(pid > 0, "refusing to signal pid {pid}");
    // SAFETY: kill with a positive pid signals exactly that process.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        assert!(
            err.raw_os_error() == Some(libc::ESRCH),
            "kill({pid}, {signal}) failed: {err}"
        );
    }
}

#[allow(unsafe_code)]
pub fn is_root() -> bool {
    // SAFETY: geteuid is always safe to call.
    unsafe { libc::geteuid() == 0 }
}

/// Uid and gid of the `postgres` OS user, when the harness runs as root and
/// must drop to it (PostgreSQL refuses to run as root). `None` when not root:
/// then the servers run as the current user.
pub fn postgres_user() -> Option<(u32, u32)> {
    static IDS: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *IDS.get_or_init(|| {
        if !is_root() {
            return None;
        }
        let id = |flag: &str| -> u32 {
            let out = Command::new("id")
                .args([flag, "postgres"])
                .output()
                .expect("cannot run `id`");
            assert!(
                out.status.success(),
                "no `postgres` OS user: run scripts/deps (it creates one), or `useradd --system postgres`"
            );
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("`id` printed no number")
        };
        Some((id("-u"), id("-g")))
    })
}

/// Makes `cmd` run as the postgres OS user when we are root.
pub fn as_postgres(cmd: &mut Command) {
    if let Some((uid, gid)) = postgres_user() {
        // std calls setgroups([]) before setuid when root, so no root
        // supplementary groups leak into the server.
        cmd.uid(uid).gid(gid);
    }
}

/// Gives `path` to the postgres OS user when we are root.
pub fn chown_to_postgres(path: &Path) {
    if let Some((uid, gid)) = postgres_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
    }
}

/// Whether `pid` is still a live process (a zombie counts as dead: the
/// container's init may never reap reparented children).
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself
        // contain ") ".
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// Pids of the live children of `pid` (from /proc; a snapshot).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) && is_alive(child) {
            out.push(child);
        }
    }
    out
}

/// Blocks until none of `pids` is alive, or panics after `timeout`.
pub fn wait_gone(pids: &[u32], timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|&p| is_alive(p)) {
        assert!(
            Instant::now() < deadline,
            "{what}: processes {:?} still alive after {timeout:?}",
            pids.iter().filter(|&&p| is_alive(p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `child` to exit, up to `timeout`; `None` when it did not.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
    }
}

/// The last `lines` lines of a log file (lossy UTF-8), reading at most the
/// last 64 KiB; an explanation instead when the file cannot be read.
pub fn tail(path: &Path, lines: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("<cannot read {}: {e}>", path.display()),
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(MAX);
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut buf).is_err() {
        return format!("<cannot read {}>", path.display());
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    all.get(from..).unwrap_or_default().join("\n")
}

/// Opens (creating) a log file for appending, for a child's stdout/stderr.
pub fn append_log(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open log {}: {e}", path.display()))
}

/// Removes `dir` once the test binary has exited. For the folders of the
/// shared servers, whose owners live in statics and are never dropped.
///
/// A small `sh` reads folder names on its stdin; the test binary holds the
/// other end, so its exit (of any kind) is the reader's end of file. Then the
/// servers, killed by their parent-death signal, are given a moment to
/// finish exiting, and the folders go.
pub fn remove_at_exit(dir: &Path) {
    static REAPER: OnceLock<Mutex<Option<ChildStdin>>> = OnceLock::new();
    const SCRIPT: &str = r#"
set -f
nl='
'
list=''
while IFS= read -r d; do list="$list$d$nl"; done
sleep 1
IFS=$nl
for d in $list; do rm -rf -- "$d" 2>/dev/null || { sleep 2; rm -rf -- "$d"; }; done
"#;
    let reaper = REAPER.get_or_init(|| {
        let stdin = Command::new("sh")
            .args(["-c", SCRIPT])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C on the test run must not stop
            // it before it has cleaned up.
            .process_group(0)
            .spawn()
            .ok()
            .and_then(|mut child| child.stdin.take());
        Mutex::new(stdin)
    });
    let mut guard = reaper.lock().unwrap_or_else(|p| p.into_inner());
    let path: PathBuf = dir.to_path_buf();
    if let Some(stdin) = guard.as_mut() {
        // A folder that cannot be registered is only left behind in the
        // temp dir; not worth failing a test for.
        let _ = writeln!(stdin, "{}", path.display());
    }
}
