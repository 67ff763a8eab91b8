//! The world's control channel: a Unix socket in the world's directory
//! (`control.sock`, in a directory only its owner can enter) on which
//! `strata-cluster up` takes one request per connection and answers one
//! line of JSON. Requests are one line:
//!
//! ```text
//! status
//! pause kube-apiserver        # SIGSTOP to its process group
//! resume kube-apiserver       # SIGCONT
//! kill kube-controller-manager  # SIGKILL; the supervisor restarts it after its backoff
//! stop etcd                   # SIGTERM (SIGKILL after 5 s); stays down until started
//! start etcd
//! restart kube-scheduler      # stop, then start
//! ```
//!
//! The answer: `{"ok":true,"components":[{"component":"kube-apiserver",
//! "state":"paused","pid":1234,"restarts":0,"lastExit":null,"log":"..."}]}`
//! (every component for `status`, the one acted on otherwise), or
//! `{"ok":false,"error":"..."}`. Bounded: a request line of at most
//! [`MAX_LINE`] bytes read within [`READ_TIMEOUT`], at most
//! [`MAX_CONNECTIONS`] at once. Humans use it through `strata-cluster ctl`,
//! tests through `harness::World::fault`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::supervisor::{ComponentStatus, Handle};

/// The socket's file name in the world's directory.
pub const SOCKET_NAME: &str = "control.sock";
/// Longest request line, bytes.
pub const MAX_LINE: u64 = 256;
/// How long a client may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once (beyond: answered busy).
pub const MAX_CONNECTIONS: usize = 4;
/// How long a client waits for an answer (a stop may take its grace period).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A part of the world's control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Component {
    /// etcd.
    #[serde(rename = "etcd")]
    Etcd,
    /// kube-apiserver.
    #[serde(rename = "kube-apiserver")]
    ApiServer,
    /// kube-controller-manager.
    #[serde(rename = "kube-controller-manager")]
    ControllerManager,
    /// kube-scheduler.
    #[serde(rename = "kube-scheduler")]
    Scheduler,
    /// KWOK (the simulated kubelets).
    #[serde(rename = "kwok")]
    Kwok,
}

impl Component {
    /// Every component, in start order.
    pub const ALL: [Component; 5] = [
        Component::Etcd,
        Component::ApiServer,
        Component::ControllerManager,
        Component::Scheduler,
        Component::Kwok,
    ];

    /// Its name (the process's, and its log file's stem).
    pub fn name(self) -> &'static str {
        match self {
            Component::Etcd => "etcd",
            Component::ApiServer => "kube-apiserver",
            Component::ControllerManager => "kube-controller-manager",
            Component::Scheduler => "kube-scheduler",
            Component::Kwok => "kwok",
        }
    }

    /// The component of that name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to do to a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// SIGTERM (then SIGKILL); not restarted until started.
    Stop,
    /// Start a stopped component (or one waiting out its backoff) now.
    Start,
    /// SIGSTOP: the process exists but does nothing (a stalled component).
    Pause,
    /// SIGCONT after a pause.
    Resume,
    /// SIGKILL: a crash; the supervisor restarts it after its backoff.
    Kill,
    /// Stop, then start.
    Restart,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 6] = [
        Action::Stop,
        Action::Start,
        Action::Pause,
        Action::Resume,
        Action::Kill,
        Action::Restart,
    ];

    /// Its word in requests.
    pub fn name(self) -> &'static str {
        match self {
            Action::Stop => "stop",
            Action::Start => "start",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Kill => "kill",
            Action::Restart => "restart",
        }
    }

    /// The action of that word.
    pub fn parse(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == word)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A request on the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Every component's state.
    Status,
    /// An action on one component.
    Act(Action, Component),
}

impl Request {
    /// Parses a request line (pure).
    pub fn parse(line: &str) -> std::result::Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let names = || {
            Component::ALL
                .iter()
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match words.as_slice() {
            ["status"] => Ok(Request::Status),
            [verb, name] => {
                let action = Action::parse(verb).ok_or_else(|| {
                    format!("unknown action {verb:?}: status, stop, start, pause, resume, kill or restart")
                })?;
                let component = Component::parse(name)
                    .ok_or_else(|| format!("unknown component {name:?}: one of {}", names()))?;
                Ok(Request::Act(action, component))
            }
            _ => Err(format!(
                "expected `status` or `<action> <component>`, got {:?}",
                line.trim()
            )),
        }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Status => f.write_str("status"),
            Request::Act(a, c) => write!(f, "{a} {c}"),
        }
    }
}

/// The answer to a request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether it was done.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The components concerned, after the request.
    #[serde(default)]
    pub components: Vec<ComponentStatus>,
}

impl Reply {
    fn error(e: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(e.into()),
            components: Vec::new(),
        }
    }
}

/// Serves the channel on `path` (replacing a stale socket) until aborted.
pub fn serve(path: &Path, supervisor: Handle) -> Result<JoinHandle<()>> {
    let control_err = |e: std::io::Error| Error::Control(format!("{}: {e}", path.display()));
    if path.as_os_str().len() >= 100 {
        return Err(Error::Control(format!(
            "{}: too long for a Unix socket path (use a shorter --dir)",
            path.display()
        )));
    }
    if path.exists() {
        std::fs::remove_file(path).map_err(control_err)?;
    }
    let listener = UnixListener::bind(path).map_err(control_err)?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let supervisor = supervisor.clone();
            match slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(async move {
                        answer(stream, &supervisor).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    tokio::spawn(async move {
                        let mut stream = stream;
                        write_reply(
                            &mut stream,
                            &Reply::error("busy: too many requests at once"),
                        )
                        .await;
                    });
                }
            }
        }
    }))
}

async fn answer(stream: UnixStream, supervisor: &Handle) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_LINE + 1));
    let reply = match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => Reply::error(format!("no request within {READ_TIMEOUT:?}")),
        Ok(Err(e)) => Reply::error(format!("reading the request: {e}")),
        Ok(Ok(_)) if line.len() as u64 > MAX_LINE => {
            Reply::error(format!("request longer than {MAX_LINE} bytes"))
        }
        Ok(Ok(_)) => match Request::parse(&line) {
            Err(e) => Reply::error(e),
            Ok(request) => {
                tracing::info!(%request, "control request");
                match request {
                    Request::Status => match supervisor.status().await {
                        Ok(components) => Reply {
                            ok: true,
                            error: None,
                            components,
                        },
                        Err(e) => Reply::error(e),
                    },
                    Request::Act(action, component) => {
                        match supervisor.act(component, action).await {
                            Ok(status) => Reply {
                                ok: true,
                                error: None,
                                components: vec![status],
                            },
                            Err(e) => Reply::error(e),
                        }
                    }
                }
            }
        },
    };
    let text = serde_json::to_string(&reply)
        .unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"serializing the reply: {e}\"}}"));
    let _ = write.write_all(format!("{text}\n").as_bytes()).await;
    let _ = write.shutdown().await;
}

async fn write_reply(stream: &mut UnixStream, reply: &Reply) {
    if let Ok(text) = serde_json::to_string(reply) {
        let _ = stream.write_all(format!("{text}\n").as_bytes()).await;
    }
    let _ = stream.shutdown().await;
}

/// Sends one request to the world at `socket`; its answer. A refused request
/// (`ok: false`) is an error too, with the world's reason.
pub async fn send(socket: &Path, request: Request) -> Result<Reply> {
    let err = |what: String| Error::Control(format!("{} ({request}): {what}", socket.display()));
    let exchange = async {
        let mut stream = UnixStream::connect(socket)
            .await
            .map_err(|e| err(format!("connecting: {e}")))?;
        stream
            .write_all(format!("{request}\n").as_bytes())
            .await
            .map_err(|e| err(format!("sending: {e}")))?;
        let mut line = String::new();
        BufReader::new(stream.take(1 << 20))
            .read_line(&mut line)
            .await
            .map_err(|e| err(format!("reading the answer: {e}")))?;
        let reply: Reply = serde_json::from_str(line.trim())
            .map_err(|e| err(format!("the answer {:?}: {e}", line.trim())))?;
        if reply.ok {
            Ok(reply)
        } else {
            Err(err(reply.error.unwrap_or_else(|| "refused".into())))
        }
    };
    match tokio::time::timeout(CLIENT_TIMEOUT, exchange).await {
        Ok(r) => r,
        Err(_) => Err(err(format!("no answer within {CLIENT_TIMEOUT:?}"))),
    }
}

/// The control socket of the world in `dir`.
pub fn socket_in(dir: &Path) -> PathBuf {
    dir.join(SOCKET_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_and_says_what_is_wrong() {
        assert_eq!(Request::parse("status\n"), Ok(Request::Status));
        assert_eq!(
            Request::parse("pause kube-apiserver"),
            Ok(Request::Act(Action::Pause, Component::ApiServer))
        );
        assert_eq!(
            Request::parse("  kill   kube-controller-manager \r\n"),
            Ok(Request::Act(Action::Kill, Component::ControllerManager))
        );
        for (line, expect) in [
            ("", "expected `status`"),
            ("pause", "expected `status`"),
            ("freeze etcd", "unknown action \"freeze\""),
            (
                "stop apiserver",
                "unknown component \"apiserver\": one of etcd, kube-apiserver",
            ),
            ("stop etcd now", "expected `status`"),
        ] {
            let e = Request::parse(line).expect_err(line);
            assert!(e.contains(expect), "{line:?}: {e}");
        }
        for c in Component::ALL {
            for a in Action::ALL {
                let r = Request::Act(a, c);
                assert_eq!(Request::parse(&r.to_string()), Ok(r));
            }
        }
    }

    #[test]
    fn replies_round_trip_with_component_names() {
        let reply = Reply {
            ok: true,
            error: None,
            components: vec![ComponentStatus {
                component: Component::ApiServer,
                state: crate::supervisor::State::Paused,
                pid: Some(42),
                restarts: 1,
                last_exit: None,
                log: PathBuf::from("/w/logs/kube-apiserver.log"),
            }],
        };
        let text = serde_json::to_string(&reply).expect("json");
        assert!(
            text.contains(r#""component":"kube-apiserver","state":"paused","pid":42"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Reply>(&text).expect("parse"), reply);
    }

    #[tokio::test]
    async fn serves_requests_over_the_socket_within_its_bounds() {
        let dir = tempfile::tempdir().expect("dir");
        let mut sup = crate::supervisor::Supervisor::new(dir.path());
        sup.spawn(crate::supervisor::Spec {
            component: Component::Scheduler,
            program: PathBuf::from("/bin/sleep"),
            args: vec!["300".into()],
            env: Vec::new(),
        })
        .expect("spawn");
        let (handle, task) = sup.run();
        let socket = socket_in(dir.path());
        let server = serve(&socket, handle.clone()).expect("serve");

        let reply = send(&socket, Request::Status).await.expect("status");
        assert_eq!(reply.components.len(), 1);
        assert_eq!(reply.components[0].component, Component::Scheduler);
        let reply = send(&socket, Request::Act(Action::Pause, Component::Scheduler))
            .await
            .expect("pause");
        assert_eq!(reply.components[0].state, crate::supervisor::State::Paused);
        let e = send(&socket, Request::Act(Action::Stop, Component::Etcd))
            .await
            .expect_err("no etcd here");
        assert!(
            e.to_string().contains("etcd is not part of this world"),
            "{e}"
        );

        // A request line that never ends is cut at MAX_LINE.
        let mut raw = UnixStream::connect(&socket).await.expect("connect");
        raw.write_all(&[b'x'; 600]).await.expect("write");
        let mut answer = String::new();
        BufReader::new(raw)
            .read_line(&mut answer)
            .await
            .expect("answer");
        assert!(answer.contains("longer than 256 bytes"), "{answer}");

        server.abort();
        handle.shutdown().await;
        task.await.expect("task");
    }
}
