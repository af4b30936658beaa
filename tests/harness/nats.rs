//! nats-server with JetStream on file storage.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::process;

pub struct NatsServer {
    jetstream: bool,
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    config: Option<String>,
    child: Mutex<Option<Child>>,
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        Self::start_with(None).await
    }

    /// `config`: the text of a nats-server config file (auth, TLS,
    /// max_payload...); JetStream, the store dir and the port are added.
    pub async fn start_with(config: Option<&str>) -> NatsServer {
        Self::start_full(config, true).await
    }

    /// A server without JetStream, for the refusal tests.
    pub async fn start_without_jetstream() -> NatsServer {
        Self::start_full(None, false).await
    }

    async fn start_full(config: Option<&str>, jetstream: bool) -> NatsServer {
        let bin = std::env::var_os("WALNATS_NATS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| super::repo_root().join(".deps/py/bin/nats-server"));
        assert!(
            bin.exists(),
            "no nats-server at {} (set WALNATS_NATS_SERVER, or run scripts/deps)",
            bin.display()
        );
        let server = NatsServer {
            jetstream,
            bin,
            dir: super::temp_dir("walnats-nats-"),
            port: super::free_port(),
            config: config.map(str::to_owned),
            child: Mutex::new(None),
        };
        server.launch().await;
        server
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("nats.log")
    }

    async fn launch(&self) {
        let mut cmd = Command::new(&self.bin);
        if self.jetstream {
            cmd.args(["-js", "-sd"]).arg(self.dir.join("store"));
        }
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(text) = &self.config {
            let path = self.dir.join("nats.conf");
            std::fs::write(&path, text).unwrap();
            cmd.arg("-c").arg(path);
        }
        cmd.stdin(Stdio::null())
            .stdout(process::append_log(&self.log_path()))
            .stderr(process::append_log(&self.log_path()));
        let child = process::spawn_tied(cmd).expect("cannot start nats-server");
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                if log.matches("Server is ready").count() >= self.starts() {
                    return;
                }
            }
            let exited = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(exited.is_none(), "nats-server exited:\n{}", self.log_tail());
            assert!(
                Instant::now() < deadline,
                "nats-server did not start:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn starts(&self) -> usize {
        // Each launch appends to the log; count the launches so far.
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .matches("Starting nats-server")
            .count()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn log_tail(&self) -> String {
        process::tail(&self.log_path(), 40)
    }

    fn stop_with(&self, sig: i32) {
        let mut guard = self.child.lock().unwrap();
        if let Some(mut child) = guard.take() {
            process::signal(child.id(), sig);
            if process::wait_child(&mut child, Duration::from_secs(20)).is_none() {
                process::signal(child.id(), libc::SIGKILL);
                let _ = child.wait();
            }
        }
    }

    pub fn kill9(&self) {
        self.stop_with(libc::SIGKILL);
    }

    /// SIGTERM: a clean shutdown.
    pub fn stop(&self) {
        self.stop_with(libc::SIGTERM);
    }

    /// Same port and store dir: file storage survives.
    pub async fn start_again(&self) {
        self.launch().await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop_with(libc::SIGKILL);
    }
}
