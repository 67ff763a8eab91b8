//! Child processes of the local world: each in its own process group, its
//! output in a log file, stopped with SIGTERM and then SIGKILL.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::error::{Error, Result, io_err};

/// A running component.
#[derive(Debug)]
pub struct Component {
    /// Its name (also the log file's stem).
    pub name: String,
    /// Its log file.
    pub log: PathBuf,
    child: Child,
}

/// The last `lines` lines of a file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Component {
    /// Starts `program` with `args` and `env`, output to `<log_dir>/<name>.log`
    /// (a new file).
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> Result<Self> {
        Self::spawn_logged(name, program, args, env, log_dir, None)
    }

    /// Starts it again after an exit: output appended to the same log,
    /// after a line saying why (what a kubelet's restart looks like in one
    /// file: the previous run's last words, then the next run's first).
    pub fn respawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
        why: &str,
    ) -> Result<Self> {
        Self::spawn_logged(name, program, args, env, log_dir, Some(why))
    }

    fn spawn_logged(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
        append: Option<&str>,
    ) -> Result<Self> {
        use std::io::Write;
        std::fs::create_dir_all(log_dir).map_err(io_err(log_dir))?;
        let log = log_dir.join(format!("{name}.log"));
        let mut out = match append {
            None => std::fs::File::create(&log).map_err(io_err(&log))?,
            Some(_) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(io_err(&log))?,
        };
        if let Some(why) = append {
            writeln!(out, "==== {why} ====").map_err(io_err(&log))?;
        }
        let err = out.try_clone().map_err(io_err(&log))?;
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| Error::Spawn {
                name: name.to_string(),
                source,
            })?;
        tracing::debug!(component = name, pid = child.id(), "started");
        Ok(Self {
            name: name.to_string(),
            log,
            child,
        })
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// How it exited, if it has (without waiting).
    pub fn exit_status(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => Some(status.to_string()),
            Err(e) => Some(format!("unknown: {e}")),
        }
    }

    /// Sends `signal` to the process's group (the process and whatever it
    /// started). An error if it has already been reaped.
    pub fn signal_group(&self, signal: Signal) -> std::result::Result<(), String> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| format!("{} is not running", self.name))?;
        killpg(Pid::from_raw(pid as i32), signal)
            .map_err(|e| format!("{signal} to {}: {e}", self.name))
    }

    /// An error if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.exited(status.to_string())),
            Err(e) => Err(self.exited(format!("unknown: {e}"))),
        }
    }

    fn exited(&self, status: String) -> Error {
        Error::Exited {
            name: self.name.clone(),
            status,
            log: self.log.display().to_string(),
            tail: tail(&self.log, 30),
        }
    }

    /// Waits for the process to exit and returns its status as text.
    pub async fn wait(&mut self) -> String {
        match self.child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => format!("unknown: {e}"),
        }
    }

    /// SIGTERM to the process group, then SIGKILL after `grace`. A paused
    /// (SIGSTOPped) process is continued so that it can act on the SIGTERM.
    pub async fn stop(&mut self, grace: Duration) {
        let Some(pid) = self.child.id() else {
            return;
        };
        let group = Pid::from_raw(pid as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let _ = killpg(group, Signal::SIGCONT);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(component = %self.name, "did not stop within {grace:?}; killing");
            let _ = killpg(group, Signal::SIGKILL);
            let _ = self.child.wait().await;
        }
        // Children that outlived their parent in the group.
        let _ = killpg(group, Signal::SIGKILL);
        tracing::debug!(component = %self.name, "stopped");
    }
}
