//! What e2e tests use: one local world per test binary, a namespace per test,
//! and helpers for kubectl, helm and waiting on conditions.
//!
//! The world runs in a `strata-cluster` child process whose standard input is
//! a pipe from the test binary: when the test binary exits for any reason
//! (success, panic, abort, kill), the pipe closes and the cluster stops and
//! removes its directory. Set `STRATA_E2E_KUBECONFIG` to run the tests
//! against a cluster you keep up yourself (see docs/testing.md).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::{Condition, await_condition};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::cluster::{ClusterInfo, client_from};
use crate::control::{Action, Component, Request};
use crate::error::{Error, Result};
use crate::runner::RunnerConfig;
use crate::supervisor::{ComponentStatus, State};

/// Label on every namespace a test creates.
pub const TEST_NAMESPACE_LABEL: &str = "e2e.strata.ai/test";

/// The shared local world of a test binary.
pub struct World {
    /// Where things are.
    pub info: ClusterInfo,
    _supervisor: Option<Mutex<Child>>,
}

static WORLD: OnceLock<std::result::Result<World, String>> = OnceLock::new();

/// The world of this test binary, started on first use.
///
/// `cluster_exe` is the `strata-cluster` binary (in tests:
/// `env!("CARGO_BIN_EXE_strata-cluster")`); `runner` the pod runner's
/// profiles. Panics with the reason if the world cannot start.
pub fn world(cluster_exe: &str, runner: impl FnOnce() -> RunnerConfig) -> &'static World {
    let result = WORLD
        .get_or_init(|| start_world(Path::new(cluster_exe), runner()).map_err(|e| e.to_string()));
    match result {
        Ok(w) => w,
        Err(e) => panic!("the local world did not start: {e}"),
    }
}

fn start_world(exe: &Path, runner: RunnerConfig) -> Result<World> {
    if let Ok(kubeconfig) = std::env::var("STRATA_E2E_KUBECONFIG") {
        let bin_dir = crate::tools::ensure_binaries()?;
        let kubeconfig = PathBuf::from(kubeconfig);
        let dir = kubeconfig
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let log_dir = dir.join("logs");
        // The cluster is yours; the pod runner with this binary's profiles runs
        // in a child owned like a world (run one test binary at a time).
        let runner_child = start_runner_child(exe, &kubeconfig, &runner, &log_dir)?;
        let control_socket = Some(crate::control::socket_in(&dir)).filter(|p| p.exists());
        let audit_log = Some(log_dir.join(crate::audit::LOG_NAME)).filter(|p| p.exists());
        return Ok(World {
            info: ClusterInfo {
                log_dir,
                dir,
                kubeconfig,
                server: String::new(),
                bin_dir,
                nodes: Vec::new(),
                startup_seconds: 0.0,
                control_socket,
                audit_log,
                topology: None,
            },
            _supervisor: Some(Mutex::new(runner_child)),
        });
    }
    let mut cmd = Command::new(exe);
    cmd.args(["up", "--exit-on-stdin-eof", "--runner-config", "-"]);
    // STRATA_E2E_KEEP=1 keeps the world's directory (logs, audit log) after
    // the test binary ends, to read what happened.
    if std::env::var_os("STRATA_E2E_KEEP").is_some_and(|v| !v.is_empty() && v != "0") {
        cmd.arg("--keep");
    }
    // Generous: on a cold machine strata-cluster first builds the upstream
    // binaries (e2e/tools/build.sh), which takes minutes.
    let (mut child, line) = spawn_owned(
        cmd,
        &runner,
        Duration::from_secs(1800),
        "strata-cluster to report ready",
    )?;
    if line.trim().is_empty() {
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        return Err(Error::Tools(format!(
            "strata-cluster exited ({status}) before the cluster was ready; see its log above"
        )));
    }
    let info: ClusterInfo = serde_json::from_str(line.trim()).map_err(|e| Error::Serialize {
        what: "strata-cluster's ready line".into(),
        reason: e.to_string(),
    })?;
    Ok(World {
        info,
        _supervisor: Some(Mutex::new(child)),
    })
}

/// Starts `strata-cluster runner` for an existing cluster; it stops every
/// pod process when this test process ends (its stdin closes).
fn start_runner_child(
    exe: &Path,
    kubeconfig: &Path,
    runner: &RunnerConfig,
    log_dir: &Path,
) -> Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.args([
        "runner",
        "--exit-on-stdin-eof",
        "--runner-config",
        "-",
        "--kubeconfig",
    ])
    .arg(kubeconfig)
    .arg("--log-dir")
    .arg(log_dir.join("pods"));
    let (child, line) = spawn_owned(
        cmd,
        runner,
        Duration::from_secs(60),
        "strata-cluster runner to start",
    )?;
    if !line.contains("ready") {
        return Err(Error::Tools(
            "strata-cluster runner did not start; see its log above".into(),
        ));
    }
    Ok(child)
}

/// Spawns a strata-cluster command owned by this process: the runner
/// configuration goes in as one JSON line on its stdin, which stays open (the
/// child exits when it closes); returns the child and its first stdout line.
fn spawn_owned(
    mut cmd: Command,
    runner: &RunnerConfig,
    timeout: Duration,
    what: &str,
) -> Result<(Child, String)> {
    use std::io::Write;
    let config = serde_json::to_string(runner).map_err(|e| Error::Serialize {
        what: "runner config".into(),
        reason: e.to_string(),
    })?;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| Error::Spawn {
            name: format!("{cmd:?}"),
            source,
        })?;
    let stdin = child
        .stdin
        .as_mut()
        .ok_or_else(|| Error::Tools("no stdin".into()))?;
    writeln!(stdin, "{config}").map_err(crate::error::io_err("strata-cluster stdin"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::Tools("no stdout".into()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(timeout).map_err(|_| Error::Timeout {
        what: what.into(),
        seconds: timeout.as_secs(),
    })?;
    Ok((child, line))
}

impl World {
    /// A client with the admin kubeconfig (create one per test: clients are
    /// bound to the runtime they were made on).
    pub async fn client(&self) -> Client {
        match client_from(&self.info.kubeconfig).await {
            Ok(c) => c,
            Err(e) => panic!("client for {}: {e}", self.info.kubeconfig.display()),
        }
    }

    /// The world's control socket.
    fn control_socket(&self) -> Result<&Path> {
        self.info.control_socket.as_deref().ok_or_else(|| {
            Error::Control(
                "this world has no control socket (a cluster kept up by hand before it had one?)"
                    .into(),
            )
        })
    }

    /// Injects a fault (or heals one): stops, starts, pauses (SIGSTOP),
    /// resumes (SIGCONT), kills (SIGKILL; restarted by the supervisor after
    /// its backoff) or restarts one component while the rest stays up. A
    /// stopped component stays down until started. Its state afterwards.
    pub async fn fault(&self, component: Component, action: Action) -> Result<ComponentStatus> {
        let reply =
            crate::control::send(self.control_socket()?, Request::Act(action, component)).await?;
        reply.components.into_iter().next().ok_or_else(|| {
            Error::Control(format!("no state in the answer to {action} {component}"))
        })
    }

    /// Every component's state (pid, restarts, last exit), in start order.
    pub async fn components(&self) -> Result<Vec<ComponentStatus>> {
        Ok(
            crate::control::send(self.control_socket()?, Request::Status)
                .await?
                .components,
        )
    }

    /// One component's state.
    pub async fn component(&self, component: Component) -> Result<ComponentStatus> {
        self.components()
            .await?
            .into_iter()
            .find(|c| c.component == component)
            .ok_or_else(|| Error::Control(format!("{component} is not part of this world")))
    }

    /// The process ids of the components that have a process now.
    pub async fn pids(&self) -> Result<BTreeMap<Component, u32>> {
        Ok(self
            .components()
            .await?
            .into_iter()
            .filter_map(|c| c.pid.map(|p| (c.component, p)))
            .collect())
    }

    /// Undoes whatever a fault left behind (a test that failed half-way):
    /// resumes paused components, starts stopped ones, then waits until the
    /// API server answers `/readyz` and every component runs.
    pub async fn heal(&self, timeout: Duration) -> Result<()> {
        for c in self.components().await? {
            match c.state {
                State::Paused => {
                    self.fault(c.component, Action::Resume).await?;
                }
                State::Stopped | State::Restarting => {
                    self.fault(c.component, Action::Start).await?;
                }
                State::Running => {}
            }
        }
        self.api_ready(timeout).await?;
        crate::wait::poll_until(
            "every component running",
            timeout,
            Duration::from_millis(200),
            || async {
                Ok(self
                    .components()
                    .await?
                    .iter()
                    .all(|c| c.state == State::Running))
            },
        )
        .await
    }

    /// Waits until the API server answers `/readyz` with ok (a new client
    /// each try: one made while the server was down may hold dead
    /// connections).
    pub async fn api_ready(&self, timeout: Duration) -> Result<()> {
        crate::wait::poll_until(
            "kube-apiserver /readyz",
            timeout,
            Duration::from_millis(200),
            || async {
                let client = client_from(&self.info.kubeconfig).await?;
                let req = http::Request::get("/readyz")
                    .body(Vec::new())
                    .map_err(|e| Error::Kubeconfig(e.to_string()))?;
                Ok(
                    tokio::time::timeout(Duration::from_secs(2), client.request_text(req))
                        .await
                        .is_ok_and(|r| r.is_ok_and(|b| b.trim() == "ok")),
                )
            },
        )
        .await
    }

    /// Creates a node of the world's topology again (after a test deleted
    /// it) and waits until KWOK has made it Ready.
    pub async fn recreate_node(&self, name: &str, timeout: Duration) -> Result<()> {
        use k8s_openapi::api::core::v1::Node;
        let path = self
            .info
            .topology
            .clone()
            .unwrap_or_else(crate::topology::Topology::default_path);
        let node = crate::topology::Topology::load(&path)?
            .nodes()
            .into_iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .ok_or_else(|| Error::Topology {
                path: path.clone(),
                reason: format!("no node {name}"),
            })?;
        let client = self.client().await;
        let nodes: Api<Node> = Api::all(client);
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        let status = serde_json::json!({ "status": node.status });
        nodes
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        wait_for(nodes, name, timeout, crate::cluster::node_ready).await
    }

    /// Stops a node's heartbeat, as when a kubelet dies or its network is
    /// cut: KWOK no longer simulates that node (its label is removed, which
    /// KWOK's label-selected watch sees as the node leaving: no more Lease
    /// renewals, no status). The node lifecycle controller then marks the
    /// node Unknown once its grace period (50 s) has passed, taints it
    /// unreachable and marks its pods not ready. The pod runner keeps the
    /// pods' processes running (a partitioned node's containers do not
    /// stop).
    pub async fn stop_node_heartbeat(&self, name: &str) -> Result<()> {
        use k8s_openapi::api::core::v1::Node;
        let nodes: Api<Node> = Api::all(self.client().await);
        let unmanage = serde_json::json!({"metadata": {"labels": {
            crate::topology::KWOK_NODE_LABEL: null
        }}});
        nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(&unmanage))
            .await?;
        Ok(())
    }

    /// Starts a node's heartbeat again (KWOK simulates it again) and waits
    /// until it is Ready.
    pub async fn resume_node_heartbeat(&self, name: &str, timeout: Duration) -> Result<()> {
        use k8s_openapi::api::core::v1::Node;
        let nodes: Api<Node> = Api::all(self.client().await);
        let manage = serde_json::json!({"metadata": {"labels": {
            crate::topology::KWOK_NODE_LABEL: "fake"
        }}});
        nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(&manage))
            .await?;
        wait_for(nodes, name, timeout, crate::cluster::node_ready).await
    }

    /// The API server's audit log of writes so far (see [`crate::audit`]).
    pub fn audit_events(&self) -> Result<Vec<crate::audit::Event>> {
        let path = self
            .info
            .audit_log
            .as_deref()
            .ok_or_else(|| Error::Control("this world has no audit log".into()))?;
        crate::audit::read(path)
    }

    /// Path of an upstream binary (kubectl, helm, ...).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.info.bin_dir.join(name)
    }

    /// Runs kubectl against the world.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.run_tool("kubectl", args, None)
    }

    /// Runs kubectl with `stdin` as standard input.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        self.run_tool("kubectl", args, Some(stdin))
    }

    /// Installs charts/strata with Helm (CRDs, RBAC, the operator's
    /// ServiceAccount) with the operator Deployment scaled to 0, for a test
    /// that runs `strata-operator` as local processes with this release's
    /// ServiceAccount (see `service_account_kubeconfig`) because it must
    /// kill or stall one precisely (the fault suite); the others run the
    /// chart's operator in-cluster ([`Self::install_operator`]).
    pub fn install_chart_for_local_operator(&self) {
        // (No node agents: those operators read the sidecars' meters.)
        self.install_chart(&["nodeAgent.enabled=false"]);
    }

    /// [`Self::install_chart_for_local_operator`] with more values
    /// (`KEY=VALUE`, as `helm --set` takes them).
    pub fn install_chart(&self, values: &[&str]) {
        let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/strata");
        let chart = chart.to_string_lossy();
        let mut args = vec![
            "upgrade",
            "--install",
            "strata",
            &chart,
            "--namespace",
            "strata-system",
            "--create-namespace",
            "--set",
            "replicaCount=0",
            "--wait",
            "--timeout",
            "2m",
        ];
        for v in values {
            args.extend(["--set", v]);
        }
        let out = self.helm(&args);
        assert!(
            out.status.success(),
            "helm install: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs helm against the world (its caches kept inside the world's directory).
    pub fn helm(&self, args: &[&str]) -> Output {
        self.run_tool("helm", args, None)
    }

    fn run_tool(&self, tool: &str, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write;
        let helm_home = self.info.dir.join("helm");
        let mut cmd = Command::new(self.bin(tool));
        cmd.args(args)
            .env("KUBECONFIG", &self.info.kubeconfig)
            .env("HELM_CACHE_HOME", helm_home.join("cache"))
            .env("HELM_CONFIG_HOME", helm_home.join("config"))
            .env("HELM_DATA_HOME", helm_home.join("data"))
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("running {tool}: {e}"),
        };
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let _ = pipe.write_all(text.as_bytes());
        }
        match child.wait_with_output() {
            Ok(o) => o,
            Err(e) => panic!("running {tool}: {e}"),
        }
    }
}

/// Writes a kubeconfig that authenticates as a ServiceAccount (a bound
/// token from the TokenRequest API), so that a process run with it is held
/// to that ServiceAccount's RBAC by the real API server.
pub async fn service_account_kubeconfig(
    world: &World,
    namespace: &str,
    name: &str,
) -> Result<PathBuf> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let client = world.client().await;
    let api: Api<ServiceAccount> = Api::namespaced(client, namespace);
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: None,
            expiration_seconds: Some(6 * 3600),
            bound_object_ref: None,
        }),
        ..TokenRequest::default()
    };
    let token = api
        .create_token_request(name, &PostParams::default(), &req)
        .await?
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| Error::Kubeconfig("the TokenRequest returned no token".into()))?;
    let admin = std::fs::read_to_string(&world.info.kubeconfig)
        .map_err(crate::error::io_err(&world.info.kubeconfig))?;
    let server = admin
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .ok_or_else(|| Error::Kubeconfig("no server in the admin kubeconfig".into()))?
        .to_string();
    let ca = admin
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority: "))
        .ok_or_else(|| Error::Kubeconfig("no CA in the admin kubeconfig".into()))?
        .to_string();
    let path = world
        .info
        .dir
        .join(format!("sa-{namespace}-{name}.kubeconfig"));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: strata-e2e\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: strata-e2e\n  context:\n    cluster: strata-e2e\n    user: {name}\n    namespace: {namespace}\ncurrent-context: strata-e2e\n"
    );
    std::fs::write(&path, text).map_err(crate::error::io_err(&path))?;
    Ok(path)
}

/// A binary of this workspace (built by `cargo build --workspace --bins`,
/// which the test command runs before the tests): next to the test binary's
/// directory.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found; build it first: cargo build -p <its package> (scripts/test does)",
        path.display()
    );
    path
}

/// A port on 127.0.0.1 for a process that binds it later, chosen below the
/// kernel's ephemeral range so that no outgoing connection takes it first
/// ([`crate::ports`]); panics when none is free.
pub fn free_port() -> u16 {
    match crate::ports::free_port() {
        Ok(port) => port,
        Err(e) => panic!("no free port on 127.0.0.1: {e}"),
    }
}

/// The Prometheus binary the tests run (`STRATA_PROMETHEUS_BIN`, which
/// scripts/test sets from e2e/tools/prometheus.sh); panics without it.
pub fn prometheus_bin() -> PathBuf {
    let Some(bin) = std::env::var_os("STRATA_PROMETHEUS_BIN").map(PathBuf::from) else {
        panic!(
            "STRATA_PROMETHEUS_BIN is not set: run `export STRATA_PROMETHEUS_BIN=\"$(e2e/tools/prometheus.sh | tail -n 1)\"` \
             (scripts/test does this)"
        );
    };
    assert!(
        bin.is_file(),
        "STRATA_PROMETHEUS_BIN={} does not exist; run e2e/tools/prometheus.sh",
        bin.display()
    );
    bin
}

static NS_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Creates a fresh namespace `<prefix>-<unique>` labelled as a test namespace.
pub async fn test_namespace(client: &Client, prefix: &str) -> Result<String> {
    let n = NS_COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let name = format!(
        "{prefix}-{}-{n}-{:05x}",
        std::process::id() % 10_000,
        nanos % 0xfffff
    );
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some([(TEST_NAMESPACE_LABEL.to_string(), "true".to_string())].into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(name)
}

/// Deletes a namespace and waits until it is gone.
pub async fn delete_namespace(client: &Client, name: &str, timeout: Duration) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    wait_for(api, name, timeout, |ns: Option<&Namespace>| ns.is_none()).await
}

/// Waits (with a watch) until `condition` holds for the named object.
pub async fn wait_for<K>(
    api: Api<K>,
    name: &str,
    timeout: Duration,
    condition: impl Condition<K>,
) -> Result<()>
where
    K: Resource + Clone + std::fmt::Debug + DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    let what = format!("{} {name}", K::kind(&Default::default()));
    // (Boxed: a watch's future is large, and tests await many of these
    // from deep stacks of futures; inline they overflowed a test thread's
    // stack.)
    crate::wait::within(
        &what,
        timeout,
        Box::pin(async {
            await_condition(api, name, condition)
                .await
                .map_err(|e| Error::Kubeconfig(e.to_string()))?;
            Ok(())
        }),
    )
    .await
}

/// A path in the repository (samples/, crds/testdata/, ...).
pub fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// A YAML file of the repository (a sample manifest) as JSON.
pub fn repo_yaml(relative: &str) -> Result<serde_json::Value> {
    let path = repo_path(relative);
    let text = std::fs::read_to_string(&path).map_err(crate::error::io_err(&path))?;
    strata_crds::validation::yaml_to_json(&text).map_err(|e| crate::error::Error::Serialize {
        what: relative.to_string(),
        reason: e.to_string(),
    })
}

/// For tests: the uid a process runs as, and whether its root filesystem is
/// mounted read-only (from /proc). Panics if it cannot be read.
pub fn process_identity(pid_file: &Path) -> (u32, bool) {
    let pid =
        std::fs::read_to_string(pid_file).unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()));
    let pid = pid.trim();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .expect("uid");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    // Fields: id parent major:minor root mount-point options ...
    let root_ro = mounts
        .lines()
        .rfind(|l| l.split_whitespace().nth(4) == Some("/"))
        .and_then(|l| l.split_whitespace().nth(5))
        .is_some_and(|o| o.split(',').any(|x| x == "ro"));
    (uid, root_ro)
}

/// For tests: POSTs JSON over plain HTTP/1.1 (loopback) and returns the whole answer.
pub async fn post_json(addr: &str, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    assert!(addr.starts_with("127."), "loopback only: {addr}");
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .expect("answered in time")
        .expect("a completion through the sidecar")
}

/// The test-only engine simulator's image, at this workspace's version.
pub fn engine_sim_image() -> String {
    format!("localhost/strata-engine-sim:{}", env!("CARGO_PKG_VERSION"))
}

/// A Manual Model `name` from `samples/model-llama.yaml` (no adapters, no
/// credentials), its engine the simulator's image, on the `h100` pool,
/// with `min`..`max` replicas: a Model whose replicas run from images.
pub fn sim_image_model(name: &str, min: i32, max: i32) -> Result<strata_crds::Model> {
    let mut m = repo_yaml("samples/model-llama.yaml")?;
    m["metadata"] = serde_json::json!({ "name": name });
    let edits = serde_json::json!({
        "source": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"},
        "engine": {"type": "vLLM", "image": engine_sim_image()},
        "pools": [{"name": "h100"}],
        "minReplicas": min,
        "maxReplicas": max,
        "autoscaling": {"mode": "Manual"},
    });
    if let (Some(spec), Some(edits)) = (m["spec"].as_object_mut(), edits.as_object()) {
        spec.remove("adapters");
        spec.extend(edits.clone());
    }
    serde_json::from_value(m).map_err(|e| crate::error::Error::Serialize {
        what: format!("Model {name}"),
        reason: e.to_string(),
    })
}

/// What the node adds to the simulator's container in image mode: the
/// simulated GPU's directory (`${POD_DIR}/gpu` at `/run/strata-sim`, read
/// by the fake NVML library) and `--load-file` in it, then `knobs`.
pub fn sim_engine_injection(knobs: &[&str]) -> crate::pod_images::Injection {
    crate::pod_images::Injection {
        args: ["--load-file", "/run/strata-sim/load"]
            .iter()
            .chain(knobs)
            .map(|a| a.to_string())
            .collect(),
        mounts: vec![crate::pod_images::HostMount {
            host: "${POD_DIR}/gpu".into(),
            path: "/run/strata-sim".into(),
            read_only: false,
        }],
        ..crate::pod_images::Injection::default()
    }
}

/// The runner profile of the chart's operator pods: the pod's own
/// containers from their images, restarted in place as a kubelet does.
pub fn operator_profile() -> crate::runner::Profile {
    crate::runner::Profile {
        images: true,
        restart: true,
        ..crate::runner::Profile::default()
    }
}

/// The runner profile of model pods from images: the engine container gets
/// `engine` (e.g. [`sim_engine_injection`]), the sidecar's `sidecar` (e.g.
/// [`sidecar_fake_nvml_injection`]); restarted in place as a kubelet does.
pub fn model_image_profile(
    engine: crate::pod_images::Injection,
    sidecar: crate::pod_images::Injection,
) -> crate::runner::Profile {
    crate::runner::Profile {
        images: true,
        restart: true,
        inject: BTreeMap::from([
            ("engine".to_string(), engine),
            (SIDECAR_CONTAINER.to_string(), sidecar),
        ]),
        ..crate::runner::Profile::default()
    }
}

/// The name of the sidecar container in model pods.
pub const SIDECAR_CONTAINER: &str = "strata-sidecar";

/// Where the NVIDIA container toolkit mounts the driver's NVML library in a
/// container (Debian's multiarch path, which the sidecar image searches).
pub const NVML_IN_CONTAINER: &str = "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1";

/// What a GPU node adds to the sidecar container in image mode: the fake
/// NVML library where the toolkit would mount the real one, the pod's
/// simulated GPUs (`${GPU_UUIDS}`), the simulated GPU's directory
/// (`${POD_DIR}/gpu` at `/run/strata-sim`: the simulator's load, the
/// library's energy state); then `args`.
pub fn sidecar_fake_nvml_injection(args: &[&str]) -> crate::pod_images::Injection {
    use crate::fake_nvml::{ENV_DEVICES, ENV_LOAD_FILE, ENV_STATE_FILE, lib_path};
    let mut all = vec![
        "--meter-gpus".to_string(),
        format!("--nvml-lib={NVML_IN_CONTAINER}"),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    crate::pod_images::Injection {
        args: all,
        env: BTreeMap::from([
            (ENV_DEVICES.to_string(), "${GPU_UUIDS}".to_string()),
            (
                ENV_LOAD_FILE.to_string(),
                "/run/strata-sim/load".to_string(),
            ),
            (
                ENV_STATE_FILE.to_string(),
                "/run/strata-sim/nvml-state".to_string(),
            ),
        ]),
        mounts: vec![
            crate::pod_images::HostMount {
                host: "${POD_DIR}/gpu".into(),
                path: "/run/strata-sim".into(),
                read_only: false,
            },
            crate::pod_images::HostMount {
                host: lib_path().to_string_lossy().into_owned(),
                path: NVML_IN_CONTAINER.into(),
                read_only: true,
            },
        ],
    }
}

/// The namespace the tests install the chart into.
pub const OPERATOR_NAMESPACE: &str = "strata-system";

/// The operator replica that holds the leader Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// Its pod's name (the Lease's holder identity).
    pub pod: String,
    /// Its pod's IP (loopback in the local world).
    pub ip: String,
}

impl Leader {
    /// The leader's `/metrics` (the chart's `metrics.port`).
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.addr(8080)
    }

    /// The leader's activator (the chart's `activator.port`).
    pub fn activator_addr(&self) -> std::net::SocketAddr {
        self.addr(8081)
    }

    fn addr(&self, port: u16) -> std::net::SocketAddr {
        let ip = self
            .ip
            .parse()
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        std::net::SocketAddr::new(ip, port)
    }
}

impl World {
    /// Installs charts/strata as users do: the operator Deployment's replicas
    /// (the chart's two, leader election) run from the operator image with
    /// in-cluster configuration, their pods labelled for the runner profile
    /// `operator_profile` ([`operator_profile`]), model pods for
    /// `model_profile` (empty: none, KWOK alone runs them), the node agents (the chart's DaemonSet on GPU
    /// nodes) for [`NODE_AGENT`] (see [`chart_world`]); `values` are more
    /// `helm --set` values. Returns the leader once a ready operator pod
    /// holds the Lease.
    pub async fn install_operator(
        &self,
        operator_profile: &str,
        model_profile: &str,
        values: &[&str],
    ) -> Result<Leader> {
        let chart = repo_path("charts/strata");
        let chart = chart.to_string_lossy();
        let run = crate::runner::RUN_LABEL.replace('.', "\\.");
        let op = format!("podLabels.{run}={operator_profile}");
        let model = format!("modelPodLabels.{run}={model_profile}");
        let agent = format!("nodeAgent.podLabels.{run}={NODE_AGENT}");
        let mut args = vec![
            "upgrade",
            "--install",
            "strata",
            &chart,
            "--namespace",
            OPERATOR_NAMESPACE,
            "--create-namespace",
            "--set",
            &op,
            "--set",
            &agent,
            "--set",
            "logFormat=text",
            "--wait",
            "--timeout",
            "3m",
        ];
        // No model profile: KWOK alone runs the model pods (no processes).
        if !model_profile.is_empty() {
            args.extend(["--set", &model]);
        }
        // No model profile: KWOK alone runs the model pods (no processes).
        if !model_profile.is_empty() {
            args.extend(["--set", &model]);
        }
        for v in values {
            args.extend(["--set", v]);
        }
        let out = self.helm(&args);
        if !out.status.success() {
            let pods = self.kubectl(&["get", "pods", "-n", OPERATOR_NAMESPACE, "-o", "wide"]);
            return Err(Error::Tools(format!(
                "helm install: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&pods.stdout)
            )));
        }
        operator_leader(&self.client().await, Duration::from_secs(90)).await
    }
}

/// Waits until a ready operator pod holds the leader Lease
/// (`strata-system/strata-operator`) and returns it.
pub async fn operator_leader(client: &Client, timeout: Duration) -> Result<Leader> {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::Pod;
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let found = std::sync::Arc::new(Mutex::new(None));
    let slot = found.clone();
    crate::wait::poll_until(
        "a ready operator pod to hold the Lease strata-system/strata-operator",
        timeout,
        Duration::from_millis(300),
        move || {
            let (leases, pods, slot) = (leases.clone(), pods.clone(), slot.clone());
            async move {
                let holder = leases
                    .get_opt("strata-operator")
                    .await?
                    .and_then(|l| l.spec?.holder_identity)
                    .filter(|h| !h.is_empty());
                let Some(holder) = holder else {
                    return Ok(false);
                };
                let Some(pod) = pods.get_opt(&holder).await? else {
                    return Ok(false);
                };
                let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
                match ip {
                    Some(ip)
                        if strata_core::view::pod_ready(&pod)
                            && pod.metadata.deletion_timestamp.is_none() =>
                    {
                        if let Ok(mut s) = slot.lock() {
                            *s = Some(Leader { pod: holder, ip });
                        }
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            }
        },
    )
    .await?;
    let leader = found.lock().ok().and_then(|mut s| s.take());
    leader.ok_or_else(|| Error::Control("the leader was found but not kept".into()))
}

/// The NVIDIA container toolkit of the simulated GPU nodes (for
/// `RunnerConfig::nvidia_toolkit`): the fake NVML library into containers
/// that ask for GPUs, over the node's per-device GPU state, with `env`
/// (e.g. the fake GPUs' idle and full-load watts).
pub fn gpu_node_toolkit(env: &[(&str, &str)]) -> crate::pod_images::Toolkit {
    crate::pod_images::Toolkit {
        nvml_lib: crate::fake_nvml::lib_path().to_path_buf(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// What the node adds to the simulator's container on a node with the
/// toolkit ([`gpu_node_toolkit`]): its load published per GPU it sees
/// (`--gpu-dir`, the toolkit's mount of the node's GPU state), then
/// `knobs`. Nothing else: the devices come from the device plugin.
pub fn sim_engine_gpu_injection(knobs: &[&str]) -> crate::pod_images::Injection {
    crate::pod_images::Injection {
        args: ["--gpu-dir", crate::pod_images::TOOLKIT_GPU_DIR]
            .iter()
            .chain(knobs)
            .map(|a| a.to_string())
            .collect(),
        ..crate::pod_images::Injection::default()
    }
}

/// The runner profile of the chart's node agents in the e2e worlds.
pub const NODE_AGENT: &str = "node-agent";

/// A world for the chart ([`World::install_operator`]): `profiles`, the
/// operator's pods under `operator` and the node agents under
/// [`NODE_AGENT`] from their images, and GPU nodes with the NVIDIA toolkit
/// stand-in ([`gpu_node_toolkit`] with `toolkit_env`), which the node
/// agents need to see the GPUs.
pub fn chart_world(
    operator: &str,
    profiles: impl IntoIterator<Item = (String, crate::runner::Profile)>,
    toolkit_env: &[(&str, &str)],
) -> RunnerConfig {
    let mut all: BTreeMap<String, crate::runner::Profile> = profiles.into_iter().collect();
    all.insert(operator.to_string(), operator_profile());
    all.insert(NODE_AGENT.to_string(), operator_profile());
    RunnerConfig {
        profiles: all,
        nvidia_toolkit: Some(gpu_node_toolkit(toolkit_env)),
        ..RunnerConfig::default()
    }
}

/// Creates the GPUPool of a sample file (`samples/gpupool-h100.yaml`) if
/// this world has none of that name yet (tests of one binary share it).
pub async fn ensure_sample_pool(client: &Client, sample: &str) -> Result<()> {
    let pool: strata_crds::GPUPool =
        serde_json::from_value(repo_yaml(sample)?).map_err(|e| Error::Serialize {
            what: sample.to_string(),
            reason: e.to_string(),
        })?;
    match Api::<strata_crds::GPUPool>::all(client.clone())
        .create(&PostParams::default(), &pool)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What the tests add to the sidecar container: it checks the engine's
/// health every 0.2 s and reads its metrics every 0.5 s (defaults: 1 s and
/// 2 s), for the tests' clock.
pub fn sidecar_fast_injection() -> crate::pod_images::Injection {
    crate::pod_images::Injection {
        args: [
            "--engine-health-interval=0.2",
            "--engine-metrics-interval=0.5",
        ]
        .map(String::from)
        .to_vec(),
        ..crate::pod_images::Injection::default()
    }
}

/// The ready, not terminating pods of the Model named `model` in `pods`'
/// namespace (label `strata.ai/model`).
pub async fn ready_model_pods(
    pods: &Api<k8s_openapi::api::core::v1::Pod>,
    model: &str,
) -> Vec<k8s_openapi::api::core::v1::Pod> {
    pods.list(&kube::api::ListParams::default().labels(&format!("strata.ai/model={model}")))
        .await
        .expect("pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && strata_core::view::pod_ready(p))
        .collect()
}

/// A pod's IP, which in the local world must be a loopback address.
pub fn loopback_pod_ip(p: &k8s_openapi::api::core::v1::Pod) -> String {
    let ip = p
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");
    assert!(crate::http::is_loopback_str(&ip), "{ip}");
    ip
}
