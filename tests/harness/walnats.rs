//! The walnats binary as a child process, with its logs in a file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::process;

pub struct WalnatsProc {
    child: Option<Child>,
    log: PathBuf,
}

impl WalnatsProc {
    pub fn spawn(
        bin: &Path,
        args: &[&str],
        config_toml: &str,
        env: &[(&str, &str)],
    ) -> WalnatsProc {
        let dir = super::temp_dir("walnats-run-");
        let log = dir.join("walnats.log");
        Self::spawn_logged(bin, args, config_toml, env, &log)
    }

    /// As `spawn`, appending to `log` (several runs of one test share a
    /// log, so a failure shows what every run did).
    pub fn spawn_logged(
        bin: &Path,
        args: &[&str],
        config_toml: &str,
        env: &[(&str, &str)],
        log: &Path,
    ) -> WalnatsProc {
        let dir = super::temp_dir("walnats-run-");
        let config = dir.join("walnats.toml");
        std::fs::write(&config, config_toml).unwrap();
        let log = log.to_path_buf();
        {
            use std::io::Write;
            let _ = writeln!(
                process::append_log(&log),
                "===== walnats {}",
                args.join(" ")
            );
        }
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .arg("--config")
            .arg(&config)
            .current_dir(&dir);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(process::append_log(&log))
            .stderr(process::append_log(&log));
        let child = process::spawn_tied(cmd).expect("cannot start walnats");
        WalnatsProc {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            process::signal(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
    }

    pub fn sigterm(&mut self) {
        if let Some(c) = &self.child {
            process::signal(c.id(), libc::SIGTERM);
        }
    }

    /// Waits for the exit; panics with the log after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("walnats was not running");
        match process::wait_child(&mut c, timeout) {
            Some(s) => s,
            None => {
                process::signal(c.id(), libc::SIGKILL);
                let _ = c.wait();
                panic!(
                    "walnats did not exit within {timeout:?}:\n{}",
                    self.output()
                );
            }
        }
    }

    /// What walnats printed (stdout and stderr; the last 300 lines).
    pub fn output(&self) -> String {
        process::tail(&self.log, 300)
    }
}

impl Drop for WalnatsProc {
    fn drop(&mut self) {
        self.kill9();
    }
}
