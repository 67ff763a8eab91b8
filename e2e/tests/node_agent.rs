//! strata-node-agent as a process, as on a GPU node: the fake NVML library
//! in per-device mode (8 GPUs; a temporary directory is the node's GPU
//! state, the loads are written by the test), `NVIDIA_VISIBLE_DEVICES=all`
//! as the chart gives it, and a kubelet PodResources server on a Unix
//! socket (in this test) saying which container holds which GPU.
//!
//! Checked: dcgm-exporter's labels on every GPU's series, the holder's pod
//! labels on held GPUs; each container's joules against the fake counters'
//! deltas (within 1 %) over windows across the agent's restart (the
//! counter continues), a driver reload at the restart
//! (`STRATA_FAKE_NVML_RESET_ENERGY=1`), a counter reset while it runs, and a
//! PodResources outage (unattributed, then attributed again); and an agent
//! without NVML that keeps serving and says so.
//!
//! A scrape is compared with the counters only when no sample happened
//! while both were read (the counter files read before and after the
//! scrape are equal): the agent is the only process sampling the GPUs, so
//! the files then hold exactly what it read.
//!
//! Build the agent first: `cargo build -p strata-node-agent`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use strata_e2e::fake_nvml::{self, DeviceEnergy, FakeGpuConfig};
use strata_e2e::harness::{free_port, workspace_binary};
use strata_e2e::process::Component;
use strata_podresources::v1::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices,
    ContainerResources, GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest,
    ListPodResourcesResponse, PodResources,
};
use strata_podresources::{PodResourcesLister, PodResourcesListerServer};
use tonic::{Request, Response, Status};

const NODE: &str = "gpu-node-1";
const MODEL: &str = "NVIDIA H100 80GB HBM3";
const GPUS: usize = 8;
const MIB: f64 = 1024.0 * 1024.0;
const TIMEOUT: Duration = Duration::from_secs(30);
const INTERVAL: &str = "0.2";

fn uuid(i: usize) -> String {
    format!("GPU-{i:08x}-5717-4a6e-9b1d-0000000000{i:02}")
}

// ---------------------------------------------------------------------------
// The kubelet's PodResources API
// ---------------------------------------------------------------------------

/// Pod A's `engine` holds GPUs 2 and 5, pod B's `engine` GPU 7; the
/// sidecar containers hold none. `down` makes `List` fail.
#[derive(Clone, Default)]
struct Kubelet {
    down: Arc<AtomicBool>,
}

const A: (&str, &str, &[usize]) = ("team-a", "chat-0", &[2, 5]);
const B: (&str, &str, &[usize]) = ("team-b", "code-0", &[7]);

fn pod(ns: &str, name: &str, gpus: &[usize]) -> PodResources {
    PodResources {
        name: name.into(),
        namespace: ns.into(),
        containers: vec![
            ContainerResources {
                name: "engine".into(),
                devices: vec![ContainerDevices {
                    resource_name: "nvidia.com/gpu".into(),
                    device_ids: gpus.iter().map(|i| uuid(*i)).collect(),
                    topology: None,
                }],
                ..ContainerResources::default()
            },
            ContainerResources {
                name: "strata-sidecar".into(),
                ..ContainerResources::default()
            },
        ],
    }
}

#[tonic::async_trait]
impl PodResourcesLister for Kubelet {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("the kubelet is restarting"));
        }
        Ok(Response::new(ListPodResourcesResponse {
            pod_resources: vec![pod(A.0, A.1, A.2), pod(B.0, B.1, B.2)],
        }))
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<AllocatableResourcesRequest>,
    ) -> Result<Response<AllocatableResourcesResponse>, Status> {
        Ok(Response::new(AllocatableResourcesResponse {
            devices: vec![ContainerDevices {
                resource_name: "nvidia.com/gpu".into(),
                device_ids: (0..GPUS).map(uuid).collect(),
                topology: None,
            }],
            ..AllocatableResourcesResponse::default()
        }))
    }

    async fn get(
        &self,
        _: Request<GetPodResourcesRequest>,
    ) -> Result<Response<GetPodResourcesResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }
}

fn serve_kubelet(kubelet: Kubelet, socket: &Path) {
    std::fs::create_dir_all(socket.parent().expect("a directory")).expect("mkdir");
    let listener = tokio::net::UnixListener::bind(socket).expect("bind the kubelet socket");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PodResourcesListerServer::new(kubelet))
            .serve_with_incoming(incoming),
    );
}

// ---------------------------------------------------------------------------
// The agent and its metrics
// ---------------------------------------------------------------------------

struct Node {
    dir: tempfile::TempDir,
    gpus: PathBuf,
    socket: PathBuf,
}

impl Node {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let gpus = dir.path().join("gpus");
        let socket = dir
            .path()
            .join("var/lib/kubelet/pod-resources/kubelet.sock");
        Self { dir, gpus, socket }
    }

    fn nvml(&self) -> FakeGpuConfig {
        FakeGpuConfig::new()
            .devices((0..GPUS).map(uuid))
            .name(MODEL)
            .gpu_dir(&self.gpus)
            .visible_devices("all")
    }

    fn load(&self, gpu: usize, util: f64) {
        fake_nvml::write_device_load(&self.gpus, &uuid(gpu), util).expect("write load");
    }

    fn counters(&self) -> Vec<Option<DeviceEnergy>> {
        (0..GPUS)
            .map(|i| fake_nvml::read_device_energy(&self.gpus, &uuid(i)))
            .collect()
    }
}

struct Agent {
    component: Component,
    addr: SocketAddr,
}

impl Agent {
    fn start(node: &Node, nvml_lib: &str, nvml: &FakeGpuConfig, run: &str) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("address");
        let args: Vec<String> = [
            "--nvml-lib",
            nvml_lib,
            "--pod-resources-socket",
            &node.socket.display().to_string(),
            "--node-name",
            NODE,
            "--listen",
            &addr.to_string(),
            "--interval-seconds",
            INTERVAL,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        // Nothing of this process's own fake NVML settings leaks in.
        let mut env: Vec<(String, String)> = fake_nvml::ALL_ENV
            .iter()
            .map(|k| ((*k).to_owned(), String::new()))
            .collect();
        env.extend(nvml.env());
        env.push(("RUST_LOG".into(), "info,strata_node_agent=debug".into()));
        let component = Component::spawn(
            &format!("node-agent-{run}"),
            &workspace_binary("strata-node-agent"),
            &args,
            &env,
            node.dir.path(),
        )
        .expect("start the agent");
        Self { component, addr }
    }

    async fn get(&self, path: &str) -> Option<strata_e2e::http::Response> {
        strata_e2e::http::get(self.addr, path, Duration::from_secs(5))
            .await
            .ok()
    }

    async fn metrics(&mut self) -> Metrics {
        if let Err(e) = self.component.check_running() {
            panic!("the agent exited: {e}");
        }
        let page = self.get("/metrics").await.expect("scrape");
        assert_eq!(page.status, 200, "{}", page.body);
        Metrics::parse(&page.body)
    }

    /// Polls the metrics until `check` holds.
    async fn until(&mut self, what: &str, check: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(page) = self.get("/metrics").await
                && page.status == 200
            {
                let m = Metrics::parse(&page.body);
                if check(&m) {
                    return m;
                }
            }
            if let Err(e) = self.component.check_running() {
                panic!("the agent exited while waiting for {what}: {e}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; agent log:\n{}",
                strata_e2e::process::tail(&self.component.log, 40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn until_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(r) = self.get("/readyz").await
                && r.status == 200
            {
                return;
            }
            if let Err(e) = self.component.check_running() {
                panic!("the agent exited before it was ready: {e}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent did not become ready; log:\n{}",
                strata_e2e::process::tail(&self.component.log, 40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for `n` more completed intervals.
    async fn intervals(&mut self, n: f64) -> Metrics {
        let start = self.metrics().await.value(SAMPLES, &[]);
        self.until(&format!("{n} more intervals"), |m| {
            m.value(SAMPLES, &[]) >= start + n
        })
        .await
    }

    /// A scrape and the counters exactly as the agent last read them: no
    /// sample touched the counters while they and the page were read, and
    /// the page shows every counter as the file holds it.
    async fn consistent(&mut self, node: &Node) -> (Metrics, Vec<DeviceEnergy>) {
        for _ in 0..100 {
            let before = node.counters();
            let m = self.metrics().await;
            if node.counters() != before || before.iter().any(Option::is_none) {
                continue;
            }
            let counters: Vec<DeviceEnergy> = before.into_iter().flatten().collect();
            // NVML truncates to whole mJ; the file keeps 6 decimals.
            if (0..GPUS).all(|g| {
                m.find(COUNTER, &[("UUID", &uuid(g))])
                    .is_some_and(|c| (c - joules(&counters[g])).abs() <= 0.0011)
            }) {
                return (m, counters);
            }
        }
        panic!("no scrape between two samples in 100 tries");
    }

    async fn stop(mut self) {
        self.component.stop(Duration::from_secs(10)).await;
    }
}

const SAMPLES: &str = "strata_node_agent_samples_total";
const POD_ENERGY: &str = "strata_pod_gpu_energy_joules_total";
const GPU_ENERGY: &str = "strata_gpu_energy_joules_total";
const COUNTER: &str = "strata_gpu_energy_counter_joules";

/// A parsed exposition: `(name, labels, value)` per sample.
struct Metrics(Vec<(String, BTreeMap<String, String>, f64)>);

impl Metrics {
    fn parse(text: &str) -> Self {
        let mut out = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("name and value");
            let value: f64 = value.parse().expect("a number");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut map = BTreeMap::new();
            let mut rest = labels;
            while let Some((k, v)) = rest.split_once("=\"") {
                let end = v.find('"').expect("a closing quote");
                map.insert(k.trim_start_matches(',').to_owned(), v[..end].to_owned());
                rest = &v[end + 1..];
            }
            out.push((name.to_owned(), map, value));
        }
        Self(out)
    }

    fn all(&self, name: &str) -> Vec<(&BTreeMap<String, String>, f64)> {
        self.0
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, v)| (l, *v))
            .collect()
    }

    /// The one sample of `name` with the labels `want`.
    fn find(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.all(name).into_iter().filter(|(l, _)| {
            want.iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        });
        let first = found.next().map(|(_, v)| v);
        assert!(found.next().is_none(), "{name} {want:?} is not one series");
        first
    }

    fn value(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.find(name, want)
            .unwrap_or_else(|| panic!("no {name} {want:?}"))
    }

    fn device(&self, name: &str, gpu: usize) -> f64 {
        self.value(name, &[("UUID", &uuid(gpu))])
    }

    fn pod(&self, (ns, pod, gpus): (&str, &str, &[usize])) -> f64 {
        gpus.iter()
            .map(|g| {
                self.value(
                    POD_ENERGY,
                    &[
                        ("namespace", ns),
                        ("pod", pod),
                        ("container", "engine"),
                        ("UUID", &uuid(*g)),
                        ("Hostname", NODE),
                    ],
                )
            })
            .sum()
    }
}

/// What NVML reported for a counter: its integer millijoules, in joules.
fn joules(e: &DeviceEnergy) -> f64 {
    e.energy_mj.floor() / 1000.0
}

fn delta(from: &[DeviceEnergy], to: &[DeviceEnergy], gpus: &[usize]) -> f64 {
    gpus.iter()
        .map(|g| joules(&to[*g]) - joules(&from[*g]))
        .sum()
}

fn assert_within_1pct(what: &str, actual: f64, expected: f64) {
    assert!(
        expected > 0.0 && (actual - expected).abs() <= 0.01 * expected,
        "{what}: {actual} J is not within 1 % of the counters' {expected} J"
    );
}

/// Over the window from `s1` to `s2`: each pod's joules and each GPU's
/// follow the fake counters' deltas within 1 %; the unheld GPUs' go to the
/// node's unattributed energy.
fn assert_window(
    what: &str,
    (m1, f1): &(Metrics, Vec<DeviceEnergy>),
    (m2, f2): &(Metrics, Vec<DeviceEnergy>),
) {
    for p in [A, B] {
        assert_within_1pct(
            &format!("{what}: {}/{}", p.0, p.1),
            m2.pod(p) - m1.pod(p),
            delta(f1, f2, p.2),
        );
    }
    for g in 0..GPUS {
        assert_within_1pct(
            &format!("{what}: GPU {g}"),
            m2.device(GPU_ENERGY, g) - m1.device(GPU_ENERGY, g),
            delta(f1, f2, &[g]),
        );
    }
    let unheld: Vec<usize> = (0..GPUS)
        .filter(|g| !A.2.contains(g) && !B.2.contains(g))
        .collect();
    let unattributed = "strata_node_gpu_unattributed_energy_joules_total";
    assert_within_1pct(
        &format!("{what}: unattributed"),
        m2.value(unattributed, &[]) - m1.value(unattributed, &[]),
        delta(f1, f2, &unheld),
    );
}

/// A driver reload seen by a running agent: the GPU's counter back to 0,
/// written under the library's lock, if the counter is still `expected`
/// (no sample since); false otherwise.
fn reset_counter(node: &Node, gpu: usize, expected: &DeviceEnergy) -> bool {
    use std::io::Write;
    let dir = node.gpus.join(uuid(gpu));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .expect("lock file");
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock");
    let before = fake_nvml::read_device_energy(&node.gpus, &uuid(gpu)).expect("a counter");
    if before != *expected {
        return false;
    }
    let now_ns = now_ns();
    let tmp = dir.join("energy.test-reset");
    let mut f = std::fs::File::create(&tmp).expect("create");
    writeln!(f, "0.000000 {now_ns} {:.6}", before.last_util).expect("write");
    std::fs::rename(&tmp, dir.join("energy")).expect("rename");
    true
}

fn now_ns() -> i64 {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    i64::try_from(ns).expect("nanoseconds")
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_meters_every_gpu_and_attributes_it_to_its_pod() {
    let node = Node::new();
    // Busy held GPUs, an unheld GPU at full load, the rest idle.
    for (gpu, util) in [(0, 1.0), (2, 0.9), (5, 0.4), (7, 0.6)] {
        node.load(gpu, util);
    }
    let kubelet = Kubelet::default();

    // The kubelet is not there yet: NVML answers, PodResources does not,
    // not ready; the GPUs are metered but nobody's.
    let mut agent = Agent::start(&node, fake_nvml::LIB, &node.nvml(), "1");
    let m = agent
        .until("NVML up and PodResources failing", |m| {
            m.find("strata_node_agent_up", &[("source", "nvml")]) == Some(1.0)
                && m.find(
                    "strata_node_agent_errors_total",
                    &[("source", "podresources")],
                )
                .is_some_and(|e| e >= 1.0)
        })
        .await;
    assert_eq!(
        m.value("strata_node_agent_up", &[("source", "podresources")]),
        0.0
    );
    assert!(m.all(POD_ENERGY).is_empty());
    let not_ready = agent.get("/readyz").await.expect("readyz");
    assert_eq!(not_ready.status, 503);
    assert!(
        not_ready.body.contains("PodResources"),
        "{}",
        not_ready.body
    );

    serve_kubelet(kubelet.clone(), &node.socket);
    agent.until_ready().await;
    let m = agent
        .until("pod series", |m| !m.all(POD_ENERGY).is_empty())
        .await;

    // Every GPU, with dcgm-exporter's labels; the holder's on held ones.
    assert_eq!(m.value("strata_node_agent_gpus", &[]), GPUS as f64);
    assert_eq!(
        m.value(
            "strata_node_agent_info",
            &[("driver_version", "550.54.15"), ("Hostname", NODE)]
        ),
        1.0
    );
    for name in [
        "strata_gpu_utilization_ratio",
        "strata_gpu_memory_used_bytes",
        "strata_gpu_memory_total_bytes",
        "strata_gpu_power_watts",
        "strata_gpu_temperature_celsius",
        GPU_ENERGY,
        COUNTER,
    ] {
        let series = m.all(name);
        assert_eq!(series.len(), GPUS, "{name}: one series per GPU");
        for g in 0..GPUS {
            let (labels, _) = series
                .iter()
                .find(|(l, _)| l["UUID"] == uuid(g))
                .unwrap_or_else(|| panic!("{name} of GPU {g}"));
            let holder = [A, B].into_iter().find(|p| p.2.contains(&g));
            let (ns, pod, container) = holder.map_or(("", "", ""), |p| (p.0, p.1, "engine"));
            let expected: BTreeMap<String, String> = [
                ("gpu", g.to_string()),
                ("UUID", uuid(g)),
                ("modelName", MODEL.to_owned()),
                ("Hostname", NODE.to_owned()),
                ("namespace", ns.to_owned()),
                ("pod", pod.to_owned()),
                ("container", container.to_owned()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            assert_eq!(*labels, &expected, "{name} of GPU {g}");
        }
    }
    // Readings follow the loads (the fake's model: 70 W idle, 700 W full).
    assert_eq!(m.device("strata_gpu_utilization_ratio", 2), 0.9);
    assert_eq!(m.device("strata_gpu_power_watts", 2), 637.0);
    assert_eq!(m.device("strata_gpu_power_watts", 3), 70.0);
    assert_eq!(m.device("strata_gpu_temperature_celsius", 5), 50.0);
    assert_eq!(m.device("strata_gpu_memory_total_bytes", 0), 81559.0 * MIB);
    // Only the containers that hold GPUs have energy series.
    assert_eq!(m.all(POD_ENERGY).len(), 3);
    assert!(
        m.find(POD_ENERGY, &[("container", "strata-sidecar")])
            .is_none()
    );

    // A window: the pods' joules against the counters.
    let s1 = agent.consistent(&node).await;
    agent.intervals(3.0).await;
    node.load(2, 0.2);
    agent.intervals(3.0).await;
    let s2 = agent.consistent(&node).await;
    assert_window("first run", &s1, &s2);

    // The agent restarts: the devices' counters went on; the new agent
    // takes them as its baseline (no jump), and counts on.
    agent.stop().await;
    let stopped = node.counters();
    let mut agent = Agent::start(&node, fake_nvml::LIB, &node.nvml(), "2");
    agent.until_ready().await;
    agent.intervals(2.0).await;
    let s3 = agent.consistent(&node).await;
    let since_stop: f64 = (0..GPUS)
        .map(|g| s3.1[g].energy_mj - stopped[g].expect("a counter").energy_mj)
        .sum::<f64>()
        / 1000.0;
    for (g, before) in stopped.iter().enumerate() {
        let before = before.expect("a counter");
        assert!(
            s3.1[g].energy_mj >= before.energy_mj,
            "GPU {g}'s counter went on"
        );
        assert!(s3.0.device(COUNTER, g) >= joules(&before), "GPU {g}");
    }
    let new_total: f64 = (0..GPUS).map(|g| s3.0.device(GPU_ENERGY, g)).sum();
    assert!(
        new_total <= since_stop + 0.01,
        "the new agent counts only from its start: {new_total} J > {since_stop} J"
    );
    assert!(s3.0.pod(A) <= delta(&s2.1, &s3.1, A.2));
    agent.intervals(5.0).await;
    let s4 = agent.consistent(&node).await;
    assert_window("after a restart", &s3, &s4);

    // A driver reload with the restart: every counter back to ~0, and the
    // agent neither goes negative nor jumps.
    agent.stop().await;
    let reloaded_ns = now_ns();
    let mut agent = Agent::start(&node, fake_nvml::LIB, &node.nvml().reset_energy(true), "3");
    agent.until_ready().await;
    agent.intervals(2.0).await;
    let s5 = agent.consistent(&node).await;
    for g in 0..GPUS {
        // At most 700 W since the reload: the counter restarted from 0.
        let since_reload_ms = (s5.1[g].last_ns - reloaded_ns) as f64 / 1e6;
        assert!(
            s5.1[g].energy_mj <= 700.0 * since_reload_ms,
            "GPU {g}'s counter was reset: {} mJ in {since_reload_ms} ms",
            s5.1[g].energy_mj
        );
        assert_eq!(
            s5.0.device("strata_gpu_energy_counter_resets_total", g),
            0.0
        );
        let counted = s5.0.device(GPU_ENERGY, g);
        assert!(
            (0.0..=joules(&s5.1[g])).contains(&counted),
            "GPU {g}: {counted} J after a reload"
        );
    }
    let a = s5.0.pod(A);
    assert!(
        (0.0..=joules(&s5.1[2]) + joules(&s5.1[5])).contains(&a),
        "A: {a} J after a reload"
    );
    agent.intervals(5.0).await;
    let s6 = agent.consistent(&node).await;
    assert_window("after a driver reload", &s5, &s6);

    // A reset while the agent runs (GPU 2), between two of its samples:
    // the new value is counted, nothing negative, nothing twice.
    let mut s7 = agent.consistent(&node).await;
    let mut tries = 0;
    while !reset_counter(&node, 2, &s7.1[2]) {
        tries += 1;
        assert!(tries < 100, "no quiet moment to reset the counter in");
        s7 = agent.consistent(&node).await;
    }
    agent.intervals(4.0).await;
    let s8 = agent.consistent(&node).await;
    assert_eq!(
        s8.0.device("strata_gpu_energy_counter_resets_total", 2),
        1.0
    );
    let expected_a = joules(&s8.1[2]) + delta(&s7.1, &s8.1, &[5]);
    assert_within_1pct("A across a reset", s8.0.pod(A) - s7.0.pod(A), expected_a);
    assert_within_1pct(
        "B across A's reset",
        s8.0.pod(B) - s7.0.pod(B),
        delta(&s7.1, &s8.1, B.2),
    );

    // PodResources fails: the GPUs are nobody's, the pods' joules stand
    // still (their series stay); then attributed again.
    kubelet.down.store(true, Ordering::SeqCst);
    agent
        .until("PodResources down", |m| {
            m.find("strata_node_agent_up", &[("source", "podresources")]) == Some(0.0)
        })
        .await;
    let s9 = agent.consistent(&node).await;
    agent.intervals(3.0).await;
    let s10 = agent.consistent(&node).await;
    assert_eq!(s10.0.pod(A), s9.0.pod(A));
    assert_eq!(s10.0.pod(B), s9.0.pod(B));
    assert!(
        s10.0
            .all("strata_gpu_power_watts")
            .iter()
            .all(|(l, _)| l["pod"].is_empty()),
        "no GPU is attributed while PodResources is down"
    );
    let unattributed = "strata_node_gpu_unattributed_energy_joules_total";
    assert_within_1pct(
        "unattributed while PodResources is down",
        s10.0.value(unattributed, &[]) - s9.0.value(unattributed, &[]),
        delta(&s9.1, &s10.1, &(0..GPUS).collect::<Vec<_>>()),
    );
    kubelet.down.store(false, Ordering::SeqCst);
    agent
        .until("PodResources back", |m| {
            m.find("strata_node_agent_up", &[("source", "podresources")]) == Some(1.0)
        })
        .await;
    let s11 = agent.consistent(&node).await;
    agent.intervals(3.0).await;
    let s12 = agent.consistent(&node).await;
    assert_window("after PodResources came back", &s11, &s12);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nvml_the_agent_keeps_serving_and_says_so() {
    let node = Node::new();
    serve_kubelet(Kubelet::default(), &node.socket);
    let missing = node.dir.path().join("no-driver/libnvidia-ml.so.1");
    let mut agent = Agent::start(
        &node,
        &missing.display().to_string(),
        &node.nvml(),
        "no-nvml",
    );
    let m = agent
        .until("NVML errors counted twice", |m| {
            m.find("strata_node_agent_errors_total", &[("source", "nvml")])
                .is_some_and(|e| e >= 2.0)
        })
        .await;
    assert_eq!(m.value("strata_node_agent_up", &[("source", "nvml")]), 0.0);
    assert_eq!(
        m.value("strata_node_agent_up", &[("source", "podresources")]),
        1.0
    );
    assert_eq!(m.value("strata_node_agent_gpus", &[]), 0.0);
    assert!(m.all("strata_gpu_power_watts").is_empty());
    let ready = agent.get("/readyz").await.expect("readyz");
    assert_eq!(ready.status, 503);
    assert!(ready.body.contains("NVML"), "{}", ready.body);
    let live = agent.get("/healthz").await.expect("healthz");
    assert_eq!(live.status, 200);
    agent.stop().await;
}
