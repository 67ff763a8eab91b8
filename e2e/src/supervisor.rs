//! Supervision of the world's components, as a kubelet supervises a control
//! plane's static pods: a component that exits is started again after a
//! short backoff (its restarts counted, its log continued in the same file),
//! and each one can be stopped, paused (SIGSTOP), resumed (SIGCONT), killed
//! (SIGKILL, then restarted like any crash) or restarted on request while
//! the others stay up. A component stopped on request stays stopped until it
//! is started again.
//!
//! Startup is strict: until [`Supervisor::run`], an exit is an error (a world
//! that cannot start should say why at once); from then on the task owns the
//! processes and [`Handle`] talks to it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::control::{Action, Component};
use crate::error::{Error, Result};
use crate::process;

/// First wait before a restart.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest wait before a restart.
pub const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// A component that ran this long before it exited starts again from the
/// first backoff step.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);
/// How long a stop waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often exits are looked for.
const TICK: Duration = Duration::from_millis(200);

/// The next wait before a restart, given the last one and how long the
/// component ran before this exit (pure).
pub fn next_backoff(last: Option<Duration>, ran_for: Duration) -> Duration {
    match last {
        _ if ran_for >= BACKOFF_RESET_AFTER => BACKOFF_BASE,
        None => BACKOFF_BASE,
        Some(d) => (d * 2).clamp(BACKOFF_BASE, BACKOFF_MAX),
    }
}

/// How to start a component.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Which one.
    pub component: Component,
    /// Executable.
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
}

/// What a component is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Its process runs.
    Running,
    /// Its process is stopped by SIGSTOP (until resumed).
    Paused,
    /// Stopped on request: not restarted until started again.
    Stopped,
    /// It exited (or was killed); it starts again after its backoff.
    Restarting,
}

/// A component's state, as the control channel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    /// Which one.
    pub component: Component,
    /// What it is doing.
    pub state: State,
    /// Its process id while it has a process (running or paused).
    pub pid: Option<u32>,
    /// How many times it was started after its first start (after exits,
    /// kills and requested starts alike), as a kubelet's restartCount.
    pub restarts: u32,
    /// How its last process ended, if one has.
    pub last_exit: Option<String>,
    /// Its log (every run appended).
    pub log: PathBuf,
}

struct Supervised {
    spec: Spec,
    child: Option<process::Component>,
    state: State,
    restarts: u32,
    started: Instant,
    backoff: Option<Duration>,
    restart_at: Option<Instant>,
    last_exit: Option<String>,
}

/// The components, before and while they are supervised.
pub struct Supervisor {
    log_dir: PathBuf,
    parts: Vec<Supervised>,
}

impl Supervisor {
    /// Supervises nothing yet; logs go to `log_dir/<component>.log`.
    pub fn new(log_dir: &Path) -> Self {
        Self {
            log_dir: log_dir.to_path_buf(),
            parts: Vec::new(),
        }
    }

    /// Starts a component now (a new log file).
    pub fn spawn(&mut self, spec: Spec) -> Result<()> {
        let name = spec.component.name();
        let child =
            process::Component::spawn(name, &spec.program, &spec.args, &spec.env, &self.log_dir)?;
        self.parts.push(Supervised {
            spec,
            child: Some(child),
            state: State::Running,
            restarts: 0,
            started: Instant::now(),
            backoff: None,
            restart_at: None,
            last_exit: None,
        });
        Ok(())
    }

    /// During startup: an error if `component` has exited (or was never started).
    pub fn check(&mut self, component: Component) -> Result<()> {
        match self
            .parts
            .iter_mut()
            .find(|p| p.spec.component == component)
            .and_then(|p| p.child.as_mut())
        {
            Some(c) => c.check_running(),
            None => Err(Error::Control(format!("{component} was not started"))),
        }
    }

    /// During startup: an error if any component has exited.
    pub fn check_all(&mut self) -> Result<()> {
        for p in &mut self.parts {
            if let Some(c) = p.child.as_mut() {
                c.check_running()?;
            }
        }
        Ok(())
    }

    /// Stops every component (reverse start order), for a startup that failed.
    pub async fn stop_all(mut self) {
        for p in self.parts.iter_mut().rev() {
            if let Some(mut c) = p.child.take() {
                c.stop(STOP_GRACE).await;
            }
        }
    }

    /// From now on, restarts what exits and obeys the handle.
    pub fn run(self) -> (Handle, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(supervise(self, rx));
        (Handle { tx }, task)
    }

    fn status(&self, p: &Supervised) -> ComponentStatus {
        ComponentStatus {
            component: p.spec.component,
            state: p.state,
            pid: p.child.as_ref().and_then(process::Component::pid),
            restarts: p.restarts,
            last_exit: p.last_exit.clone(),
            log: self
                .log_dir
                .join(format!("{}.log", p.spec.component.name())),
        }
    }

    fn start(&mut self, i: usize, why: &str) {
        let log_dir = self.log_dir.clone();
        let p = &mut self.parts[i];
        let spec = &p.spec;
        match process::Component::respawn(
            spec.component.name(),
            &spec.program,
            &spec.args,
            &spec.env,
            &log_dir,
            why,
        ) {
            Ok(c) => {
                tracing::info!(component = %spec.component, pid = c.pid(), "{why}");
                p.child = Some(c);
                p.state = State::Running;
                p.restarts += 1;
                p.started = Instant::now();
                p.restart_at = None;
            }
            Err(e) => {
                let wait = next_backoff(p.backoff, Duration::ZERO);
                tracing::error!(component = %spec.component, "{why}: {e}; trying again in {wait:?}");
                p.backoff = Some(wait);
                p.state = State::Restarting;
                p.restart_at = Some(Instant::now() + wait);
            }
        }
    }

    /// Restarts what exited and what is due.
    fn tick(&mut self) {
        let now = Instant::now();
        for i in 0..self.parts.len() {
            let p = &mut self.parts[i];
            if let Some(c) = p.child.as_mut()
                && let Some(status) = c.exit_status()
            {
                let ran = p.started.elapsed();
                let wait = next_backoff(p.backoff, ran);
                tracing::warn!(
                    component = %p.spec.component,
                    "exited ({status}) after {:.1} s; restarting in {wait:?}",
                    ran.as_secs_f64()
                );
                p.child = None;
                p.backoff = Some(wait);
                p.last_exit = Some(status);
                p.state = State::Restarting;
                p.restart_at = Some(now + wait);
            }
            if p.state == State::Restarting && p.restart_at.is_some_and(|t| t <= now) {
                let why = format!(
                    "strata-cluster: restarting {} (restart {}) after it exited ({})",
                    p.spec.component,
                    p.restarts + 1,
                    p.last_exit.as_deref().unwrap_or("unknown")
                );
                self.start(i, &why);
            }
        }
    }

    async fn act(
        &mut self,
        component: Component,
        action: Action,
    ) -> Result<ComponentStatus, String> {
        let i = self
            .parts
            .iter()
            .position(|p| p.spec.component == component)
            .ok_or_else(|| format!("{component} is not part of this world"))?;
        // An exit that happened since the last tick is seen first.
        self.tick();
        match action {
            Action::Pause => {
                let p = &mut self.parts[i];
                match (p.state, p.child.as_ref()) {
                    (State::Paused, _) => {}
                    (State::Running, Some(c)) => {
                        c.signal_group(Signal::SIGSTOP)?;
                        p.state = State::Paused;
                        tracing::info!(%component, "paused (SIGSTOP)");
                    }
                    (state, _) => return Err(format!("{component} is {state:?}; cannot pause it")),
                }
            }
            Action::Resume => {
                let p = &mut self.parts[i];
                if let (State::Paused, Some(c)) = (p.state, p.child.as_ref()) {
                    c.signal_group(Signal::SIGCONT)?;
                    p.state = State::Running;
                    tracing::info!(%component, "resumed (SIGCONT)");
                }
            }
            Action::Kill => {
                let p = &mut self.parts[i];
                let Some(c) = p.child.as_mut() else {
                    return Err(format!("{component} has no process to kill"));
                };
                c.signal_group(Signal::SIGKILL)?;
                let status = c.wait().await;
                tracing::info!(%component, "killed (SIGKILL): {status}");
                // Restarted like any crash: after the backoff.
                let ran = p.started.elapsed();
                let wait = next_backoff(p.backoff, ran);
                p.child = None;
                p.backoff = Some(wait);
                p.last_exit = Some(status);
                p.state = State::Restarting;
                p.restart_at = Some(Instant::now() + wait);
            }
            Action::Stop => self.stop(i).await,
            Action::Start => {
                if matches!(self.parts[i].state, State::Stopped | State::Restarting) {
                    self.start(
                        i,
                        &format!("strata-cluster: starting {component} on request"),
                    );
                }
            }
            Action::Restart => {
                self.stop(i).await;
                self.start(
                    i,
                    &format!("strata-cluster: restarting {component} on request"),
                );
            }
        }
        Ok(self.status(&self.parts[i]))
    }

    async fn stop(&mut self, i: usize) {
        let p = &mut self.parts[i];
        if let Some(mut c) = p.child.take() {
            c.stop(STOP_GRACE).await;
            p.last_exit = c.exit_status().or(Some("stopped".into()));
            tracing::info!(component = %p.spec.component, "stopped on request");
        }
        p.state = State::Stopped;
        p.restart_at = None;
        p.backoff = None;
    }
}

enum Msg {
    Act {
        component: Component,
        action: Action,
        reply: oneshot::Sender<Result<ComponentStatus, String>>,
    },
    Status {
        reply: oneshot::Sender<Vec<ComponentStatus>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Talks to the supervising task (cheap to clone).
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Msg>,
}

impl Handle {
    /// Does `action` to `component`; its state afterwards, or why not.
    pub async fn act(
        &self,
        component: Component,
        action: Action,
    ) -> Result<ComponentStatus, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Act {
                component,
                action,
                reply,
            })
            .await
            .map_err(|_| "the supervisor has stopped".to_string())?;
        rx.await
            .map_err(|_| "the supervisor has stopped".to_string())?
    }

    /// Every component's state, in start order.
    pub async fn status(&self) -> Result<Vec<ComponentStatus>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Status { reply })
            .await
            .map_err(|_| "the supervisor has stopped".to_string())?;
        rx.await
            .map_err(|_| "the supervisor has stopped".to_string())
    }

    /// Stops every component (reverse start order) and the supervisor.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

async fn supervise(mut sup: Supervisor, mut rx: mpsc::Receiver<Msg>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Act { component, action, reply }) => {
                    let r = sup.act(component, action).await;
                    let _ = reply.send(r);
                }
                Some(Msg::Status { reply }) => {
                    sup.tick();
                    let all = sup.parts.iter().map(|p| sup.status(p)).collect();
                    let _ = reply.send(all);
                }
                Some(Msg::Shutdown { reply }) => {
                    sup.stop_all().await;
                    let _ = reply.send(());
                    return;
                }
                None => {
                    sup.stop_all().await;
                    return;
                }
            },
            _ = tick.tick() => sup.tick(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_resets_after_a_long_run() {
        let short = Duration::from_secs(1);
        assert_eq!(next_backoff(None, short), BACKOFF_BASE);
        assert_eq!(next_backoff(Some(BACKOFF_BASE), short), BACKOFF_BASE * 2);
        assert_eq!(
            next_backoff(Some(Duration::from_secs(6)), short),
            BACKOFF_MAX
        );
        assert_eq!(next_backoff(Some(BACKOFF_MAX), short), BACKOFF_MAX);
        assert_eq!(
            next_backoff(Some(BACKOFF_MAX), BACKOFF_RESET_AFTER),
            BACKOFF_BASE
        );
    }

    fn sleeper(seconds: &str) -> Spec {
        Spec {
            component: Component::Kwok,
            program: PathBuf::from("/bin/sleep"),
            args: vec![seconds.into()],
            env: Vec::new(),
        }
    }

    async fn wait_state(h: &Handle, want: impl Fn(&ComponentStatus) -> bool) -> ComponentStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = h.status().await.expect("status").remove(0);
            if want(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "state not reached: {s:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn restarts_what_exits_obeys_requests_and_keeps_one_log() {
        let dir = tempfile::tempdir().expect("dir");
        let mut sup = Supervisor::new(dir.path());
        // Exits at once: restarted after the backoff, again and again.
        sup.spawn(sleeper("0")).expect("spawn");
        let (h, task) = sup.run();
        let s = wait_state(&h, |s| s.restarts >= 2).await;
        assert!(s.last_exit.is_some());
        let log = std::fs::read_to_string(&s.log).expect("log");
        assert!(
            log.matches("restarting kwok").count() >= 2,
            "each restart is written in the same log: {log}"
        );

        // Stopped on request: stays stopped.
        let s = h.act(Component::Kwok, Action::Stop).await.expect("stop");
        assert_eq!(s.state, State::Stopped);
        assert_eq!(s.pid, None);
        tokio::time::sleep(BACKOFF_BASE * 3).await; // a stopped component is not restarted
        let s = h.status().await.expect("status").remove(0);
        assert_eq!(s.state, State::Stopped);
        let err = h
            .act(Component::Etcd, Action::Stop)
            .await
            .expect_err("not part of this world");
        assert!(err.contains("etcd"), "{err}");
        h.shutdown().await;
        task.await.expect("task");
    }

    #[tokio::test]
    async fn pause_resume_and_kill_act_on_the_process() {
        let dir = tempfile::tempdir().expect("dir");
        let mut sup = Supervisor::new(dir.path());
        sup.spawn(sleeper("300")).expect("spawn");
        let (h, task) = sup.run();
        let s = h.act(Component::Kwok, Action::Pause).await.expect("pause");
        assert_eq!(s.state, State::Paused);
        let pid = s.pid.expect("pid");
        // The signal is delivered asynchronously: the kernel shows the
        // process stopped ('T') soon after.
        let state = || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.rsplit(')').next().unwrap_or("").trim().chars().next()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while state() != Some('T') && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(state(), Some('T'), "stopped by SIGSTOP");
        let s = h
            .act(Component::Kwok, Action::Resume)
            .await
            .expect("resume");
        assert_eq!((s.state, s.pid), (State::Running, Some(pid)));
        let s = h.act(Component::Kwok, Action::Kill).await.expect("kill");
        assert_eq!(s.state, State::Restarting);
        assert!(
            s.last_exit.as_deref().is_some_and(|e| e.contains("9")),
            "{s:?}"
        );
        let s = wait_state(&h, |s| s.state == State::Running).await;
        assert_ne!(s.pid, Some(pid), "a new process");
        assert_eq!(s.restarts, 1);
        let s = h
            .act(Component::Kwok, Action::Restart)
            .await
            .expect("restart");
        assert_eq!((s.state, s.restarts), (State::Running, 2));
        h.shutdown().await;
        task.await.expect("task");
    }
}
