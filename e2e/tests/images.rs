//! Pods run from their images, as on a node: the pod runner resolves each
//! container's `image` in the local OCI image layout (`scripts/images`),
//! unpacks it, and starts the image's entrypoint with the container's
//! command, args, env, user, volumes (the ServiceAccount token included) and
//! `readOnlyRootFilesystem` (see `strata_e2e::pod_images`). A Model whose
//! engine image is the simulator's runs with the product's sidecar image;
//! images broken as they break in practice (a missing image, a wrong
//! entrypoint, a missing shared library, a write to a read-only root, a
//! root image under `runAsNonRoot`) fail the way they fail on a node.
//!
//! Needs the images: `scripts/images --profile dev strata-sidecar
//! strata-engine-sim` (scripts/test builds them first).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::{Value, json};
use strata_crds::{GPUPool, Model};
use strata_e2e::harness::{
    NODE_AGENT, World, gpu_node_toolkit, operator_profile, post_json, process_identity, repo_path,
    repo_yaml, sim_engine_gpu_injection, sim_image_model, test_namespace, wait_for, world,
};
use strata_e2e::runner::{Profile, RUN_LABEL, RunnerConfig};

const TIMEOUT: Duration = Duration::from_secs(90);
/// Containers restart in place (a Model's replicas).
const PROFILE: &str = "images";
/// A container that exits fails its pod (to read how it failed).
const ONCE: &str = "images-once";
/// The chart's operator pods.
const OPERATOR: &str = "operator";
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn engine_image() -> String {
    strata_e2e::harness::engine_sim_image()
}

fn sidecar_image() -> String {
    format!("ghcr.io/strata-ai/strata-sidecar:{VERSION}")
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

/// Adds a blob to the layout, returning its descriptor.
fn add_blob(layout: &Path, media_type: &str, data: &[u8]) -> Value {
    let tmp = layout.join("blob.tmp");
    std::fs::write(&tmp, data).expect("blob");
    let hex = sha256(&tmp);
    std::fs::rename(&tmp, layout.join("blobs/sha256").join(&hex)).expect("blob");
    json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len()})
}

/// The project's image layout plus images broken by hand, in a layout of
/// the test's own (blobs hard-linked): `localhost/broken-nolibc:test` (the
/// simulator without its base layer: no C library, no dynamic loader) and
/// `localhost/broken-entrypoint:test` (an ENTRYPOINT that is not there).
fn test_layout() -> PathBuf {
    static LAYOUT: OnceLock<PathBuf> = OnceLock::new();
    LAYOUT
        .get_or_init(|| {
            let src = std::env::var_os("STRATA_IMAGE_LAYOUT")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo_path("target/images/oci"));
            let index: Value = serde_json::from_slice(
                &std::fs::read(src.join("index.json")).unwrap_or_else(|e| {
                    panic!(
                        "{}: {e}; build the images first: scripts/images --profile dev strata-sidecar strata-engine-sim",
                        src.display()
                    )
                }),
            )
            .expect("index.json");
            let dir = repo_path(&format!("target/tmp/images-test-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("blobs/sha256")).expect("layout");
            std::fs::copy(src.join("oci-layout"), dir.join("oci-layout")).expect("oci-layout");
            for e in std::fs::read_dir(src.join("blobs/sha256")).expect("blobs").flatten() {
                let to = dir.join("blobs/sha256").join(e.file_name());
                if std::fs::hard_link(e.path(), &to).is_err() {
                    std::fs::copy(e.path(), &to).expect("blob");
                }
            }
            let manifests = index["manifests"].as_array().expect("manifests").clone();
            let engine = manifests
                .iter()
                .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == engine_image())
                .unwrap_or_else(|| panic!("{} is not in {}", engine_image(), src.display()))
                .clone();
            let blob = |d: &Value| -> Value {
                let hex = d["digest"].as_str().expect("digest").trim_start_matches("sha256:");
                serde_json::from_slice(&std::fs::read(dir.join("blobs/sha256").join(hex)).expect("blob"))
                    .expect("json")
            };
            let manifest = blob(&engine);
            let mut out = manifests.clone();
            let mut add = |name: &str, manifest: &Value| {
                let mut d = add_blob(
                    &dir,
                    "application/vnd.oci.image.manifest.v1+json",
                    manifest.to_string().as_bytes(),
                );
                d["annotations"] = json!({"org.opencontainers.image.ref.name": name});
                out.push(d);
            };
            // No base layer: the binary is there, its C library is not.
            let mut nolibc = manifest.clone();
            let layers = nolibc["layers"].as_array().expect("layers").clone();
            assert!(layers.len() >= 2, "the simulator's image has a base and an app layer");
            nolibc["layers"] = json!(layers[layers.len() - 1..]);
            add("localhost/broken-nolibc:test", &nolibc);
            // An entrypoint that is not in the image.
            let mut config = blob(&manifest["config"]);
            config["config"]["Entrypoint"] = json!(["/usr/local/bin/strata-engine-simulator"]);
            let mut wrong = manifest.clone();
            wrong["config"] = add_blob(
                &dir,
                "application/vnd.oci.image.config.v1+json",
                config.to_string().as_bytes(),
            );
            add("localhost/broken-entrypoint:test", &wrong);
            std::fs::write(
                dir.join("index.json"),
                json!({"schemaVersion": 2, "manifests": out}).to_string(),
            )
            .expect("index.json");
            dir
        })
        .clone()
}

fn the_world() -> &'static World {
    world(env!("CARGO_BIN_EXE_strata-cluster"), || {
        // The node's additions to the engine container: the simulator's
        // load published per GPU it sees (through the toolkit's mount of the
        // node's GPU state) and its speed.
        let inject = BTreeMap::from([(
            "engine".to_string(),
            sim_engine_gpu_injection(&["--itl-ms", "5", "--max-tokens-default", "8"]),
        )]);
        RunnerConfig {
            profiles: BTreeMap::from([
                (OPERATOR.to_string(), operator_profile()),
                (NODE_AGENT.to_string(), operator_profile()),
                (
                    PROFILE.to_string(),
                    Profile {
                        images: true,
                        restart: true,
                        inject,
                        ..Profile::default()
                    },
                ),
                (
                    ONCE.to_string(),
                    Profile {
                        images: true,
                        restart: false,
                        ..Profile::default()
                    },
                ),
            ]),
            image_layout: Some(test_layout()),
            // GPU nodes with the NVIDIA container toolkit (the fake NVML).
            nvidia_toolkit: Some(gpu_node_toolkit(&[])),
        }
    })
}

fn pod_dir(w: &World, ns: &str, name: &str) -> PathBuf {
    w.info.log_dir.join("pods").join(format!("{ns}_{name}.d"))
}

#[tokio::test]
async fn a_model_runs_from_the_engine_and_sidecar_images() {
    let w = the_world();
    let client = w.client().await;
    // The operator from its image too, as the chart runs it.
    w.install_operator(OPERATOR, PROFILE, &[])
        .await
        .expect("the chart's operator runs");

    let pool: GPUPool =
        serde_json::from_value(repo_yaml("samples/gpupool-h100.yaml").expect("sample"))
            .expect("pool");
    let _ = Api::<GPUPool>::all(client.clone())
        .create(&PostParams::default(), &pool)
        .await;
    let ns = test_namespace(&client, "images").await.expect("namespace");
    let models: Api<Model> = Api::namespaced(client.clone(), &ns);
    let model = sim_image_model("chat", 1, 1).expect("model");
    models
        .create(&PostParams::default(), &model)
        .await
        .expect("model");
    let ready = wait_for(models.clone(), "chat", TIMEOUT, |m: Option<&Model>| {
        m.is_some_and(|m| m.status.as_ref().is_some_and(|s| s.ready_replicas == 1))
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let list = pods
        .list(&ListParams::default().labels("strata.ai/model=chat"))
        .await
        .expect("pods");
    if let Err(e) = ready {
        let statuses: Vec<_> = list.items.iter().map(|p| p.status.clone()).collect();
        panic!("the Model's replica from its images is not ready: {e}\n{statuses:#?}");
    }
    let pod = list.items.first().expect("a pod");
    // The chart's operator puts the sidecar image of its own version in.
    let images: Vec<Option<String>> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.iter().map(|c| c.image.clone()).collect())
        .unwrap_or_default();
    assert_eq!(images, [Some(engine_image()), Some(sidecar_image())]);
    let name = pod.metadata.name.clone().expect("name");
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("ip");

    // A completion through the sidecar's image to the simulator's.
    let body = json!({"model": "chat", "prompt": "hello", "max_tokens": 4}).to_string();
    let answer = post_json(&format!("{ip}:8080"), "/v1/completions", &body).await;
    let logs = || {
        ["engine", "strata-sidecar"]
            .map(|c| {
                let f = w
                    .info
                    .log_dir
                    .join("pods")
                    .join(format!("{ns}_{name}_{c}.log"));
                format!("--- {c}:\n{}", strata_e2e::process::tail(&f, 20))
            })
            .join("\n")
    };
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}\n{}", logs());
    assert!(answer.contains("choices"), "{answer}");

    // Each container runs as its user, the sidecar on a read-only root.
    let dir = pod_dir(w, &ns, &name);
    let (engine_uid, _) = process_identity(&dir.join("engine.pid"));
    let (sidecar_uid, sidecar_ro) = process_identity(&dir.join("strata-sidecar.pid"));
    let wanted_engine_uid = pod.spec.as_ref().and_then(|s| {
        s.containers
            .iter()
            .find(|c| c.name == "engine")
            .and_then(|c| c.security_context.as_ref()?.run_as_user)
            .or(s.security_context.as_ref()?.run_as_user)
    });
    assert_eq!(
        Some(i64::from(engine_uid)),
        wanted_engine_uid.or(Some(65532))
    );
    assert_eq!(sidecar_uid, 65532, "the sidecar image's user");
    assert!(sidecar_ro, "the sidecar's root filesystem is read-only");
    // As the device plugin does: the engine container, which requests the
    // GPU, is told which of the node's GPUs it holds; the sidecar, which
    // requests none, is told nothing.
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .expect("bound");
    let visible = |pid_file: &str| {
        let pid = std::fs::read_to_string(dir.join(pid_file)).expect("pid");
        let environ =
            std::fs::read(format!("/proc/{}/environ", pid.trim())).expect("the process's env");
        environ
            .split(|b| *b == 0)
            .filter_map(|e| std::str::from_utf8(e).ok())
            .find_map(|e| e.strip_prefix("NVIDIA_VISIBLE_DEVICES="))
            .map(str::to_string)
    };
    let node_gpus: Vec<String> = (0..8)
        .map(|i| strata_e2e::devices::device_id(&node, "nvidia.com/gpu", i))
        .collect();
    let engine_gpus = visible("engine.pid").expect("NVIDIA_VISIBLE_DEVICES in the engine");
    assert!(
        engine_gpus.split(',').count() == 1 && node_gpus.contains(&engine_gpus),
        "one of {node}'s GPUs: {engine_gpus}"
    );
    assert_eq!(visible("strata-sidecar.pid"), None);
    // The toolkit: the driver's NVML library and the node's GPUs in the
    // engine's container (which asked for a GPU), not in the sidecar's; the
    // simulator publishes its load on the GPU it sees, in the node's GPU
    // state.
    let in_root = |pid_file: &str, path: &str| {
        let pid = std::fs::read_to_string(dir.join(pid_file)).expect("pid");
        std::path::Path::new(&format!("/proc/{}/root", pid.trim()))
            .join(path.trim_start_matches('/'))
            .exists()
    };
    let lib = strata_e2e::harness::NVML_IN_CONTAINER;
    assert!(in_root("engine.pid", lib), "NVML in the engine's container");
    assert!(
        !in_root("strata-sidecar.pid", lib),
        "no NVML in the sidecar's"
    );
    let load = w
        .info
        .log_dir
        .join("nodes")
        .join(&node)
        .join("gpus")
        .join(&engine_gpus)
        .join("load");
    strata_e2e::wait::poll_until(
        "the engine's load on its GPU",
        TIMEOUT,
        Duration::from_millis(200),
        || {
            let load = load.clone();
            async move { Ok(load.is_file()) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", load.display()));
}

fn raw_pod(name: &str, profile: &str, container: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {RUN_LABEL: profile}},
        "spec": {
            "containers": [container],
            "restartPolicy": "Never",
            "tolerations": [{"operator": "Exists"}],
            "nodeSelector": {"kwok.x-k8s.io/node": "fake"},
        }
    }))
    .expect("pod")
}

fn waiting_reason(p: &Pod) -> Option<(String, String)> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find_map(|c| c.state.as_ref()?.waiting.as_ref())
        .map(|w| {
            (
                w.reason.clone().unwrap_or_default(),
                w.message.clone().unwrap_or_default(),
            )
        })
}

fn failed_message(p: &Pod) -> Option<String> {
    let s = p.status.as_ref()?;
    (s.phase.as_deref() == Some("Failed")).then(|| s.message.clone().unwrap_or_default())
}

#[tokio::test]
async fn broken_images_fail_as_they_would_on_a_node() {
    let w = the_world();
    let client = w.client().await;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("nodes");
    assert!(!nodes.items.is_empty(), "the world has nodes");
    let ns = test_namespace(&client, "broken-images")
        .await
        .expect("namespace");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // The pods share the host's network here: a container that binds 0.0.0.0
    // gets its pod's IP (the runner rewrites the address in its args).
    let sim_args = json!(["--host", "0.0.0.0", "--port", "8000", "--model", "m"]);
    let cases = [
        raw_pod(
            "not-built",
            ONCE,
            json!({"name": "c", "image": "localhost/not-built:1"}),
        ),
        raw_pod(
            "wrong-entrypoint",
            ONCE,
            json!({"name": "c", "image": "localhost/broken-entrypoint:test", "args": sim_args}),
        ),
        raw_pod(
            "no-libc",
            ONCE,
            json!({"name": "c", "image": "localhost/broken-nolibc:test", "args": sim_args}),
        ),
        raw_pod(
            "wrong-command",
            ONCE,
            json!({"name": "c", "image": engine_image(), "command": ["vllm"], "args": ["serve"]}),
        ),
        raw_pod(
            "runs-as-root",
            ONCE,
            json!({"name": "c", "image": engine_image(), "args": sim_args,
            "securityContext": {"runAsUser": 0, "runAsNonRoot": true}}),
        ),
        raw_pod(
            "read-only",
            ONCE,
            json!({"name": "c", "image": engine_image(),
            "args": ["--host", "0.0.0.0", "--port", "8000", "--model", "m", "--load-file", "/var/load"],
            "securityContext": {"readOnlyRootFilesystem": true}}),
        ),
        raw_pod(
            "writable",
            ONCE,
            json!({"name": "c", "image": engine_image(),
            "args": ["--host", "0.0.0.0", "--port", "8000", "--model", "m", "--load-file", "/tmp/load"],
            "securityContext": {"readOnlyRootFilesystem": true},
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}),
        ),
    ];
    for mut p in cases {
        if p.metadata.name.as_deref() == Some("writable") {
            p.spec.as_mut().expect("spec").volumes = Some(vec![
                serde_json::from_value(json!({"name": "tmp", "emptyDir": {}})).expect("volume"),
            ]);
        }
        pods.create(&PostParams::default(), &p)
            .await
            .expect("create");
    }
    let until = |name: &'static str, f: fn(&Pod) -> bool| {
        let pods = pods.clone();
        async move {
            wait_for(pods.clone(), name, TIMEOUT, |p: Option<&Pod>| {
                p.is_some_and(f)
            })
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            pods.get(name).await.expect("the pod")
        }
    };

    // An image the store does not have: ErrImagePull, then back-off.
    let p = until("not-built", |p| {
        waiting_reason(p).is_some_and(|(r, _)| r == "ErrImagePull" || r == "ImagePullBackOff")
    })
    .await;
    let (_, message) = waiting_reason(&p).expect("waiting");
    assert!(
        message.contains("not found in the local image store"),
        "{message}"
    );

    // A wrong entrypoint, a command the image does not have, and a binary
    // whose C library and loader are missing: the container fails to start.
    for name in ["wrong-entrypoint", "wrong-command", "no-libc"] {
        let p = until(name, |p| failed_message(p).is_some()).await;
        let message = failed_message(&p).expect("failed");
        assert!(message.contains("exited"), "{name}: {message}");
        let log = std::fs::read_to_string(
            w.info
                .log_dir
                .join("pods")
                .join(format!("{ns}_{name}_c.log")),
        )
        .unwrap_or_default();
        let expected = match name {
            "wrong-command" => "executable file not found in $PATH",
            _ => "no such file or directory",
        };
        assert!(
            log.contains(expected) && message.contains(expected),
            "{name}: wanted {expected:?} in the message and the log\nmessage: {message}\nlog: {log}"
        );
    }

    // runAsNonRoot with uid 0: the kubelet refuses to create the container.
    let p = until("runs-as-root", |p| {
        waiting_reason(p).is_some_and(|(r, _)| r == "CreateContainerConfigError")
    })
    .await;
    assert!(
        waiting_reason(&p)
            .expect("waiting")
            .1
            .contains("runAsNonRoot")
    );

    // A read-only root refuses the write; an emptyDir over /tmp takes it.
    let ro = pod_dir(w, &ns, "read-only");
    let rw = pod_dir(w, &ns, "writable");
    let log_of = |name: &str| {
        std::fs::read_to_string(
            w.info
                .log_dir
                .join("pods")
                .join(format!("{ns}_{name}_c.log")),
        )
        .unwrap_or_default()
    };
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !(log_of("read-only").contains("Read-only file system")
        && rw.join("volumes/tmp/load").is_file())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "read-only log: {}\nwritable volume: {:?}",
            log_of("read-only"),
            std::fs::read_dir(rw.join("volumes/tmp")).map(|d| d.count())
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        !ro.join("containers/c/upper/var/load").exists(),
        "nothing reached the read-only root's layer"
    );

    // The ServiceAccount token, projected as the kubelet does, authenticates
    // as the pod's ServiceAccount.
    let token_dir = std::fs::read_dir(rw.join("volumes"))
        .expect("volumes")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("kube-api-access-"))
        })
        .expect("the ServiceAccount admission plugin's kube-api-access volume");
    let token = std::fs::read_to_string(token_dir.join("token")).expect("token");
    assert_eq!(
        std::fs::read_to_string(token_dir.join("namespace")).expect("namespace"),
        ns
    );
    assert!(
        std::fs::read_to_string(token_dir.join("ca.crt"))
            .expect("ca.crt")
            .contains("BEGIN CERTIFICATE")
    );
    let review = Api::<TokenReview>::all(client.clone())
        .create(
            &PostParams::default(),
            &TokenReview {
                spec: TokenReviewSpec {
                    token,
                    ..TokenReviewSpec::default()
                },
                ..TokenReview::default()
            },
        )
        .await
        .expect("token review");
    let status = review.status.expect("status");
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    assert_eq!(
        status.user.and_then(|u| u.username).as_deref(),
        Some(format!("system:serviceaccount:{ns}:default").as_str())
    );
}
