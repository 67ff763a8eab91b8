//! The pod of one replica, built from the Model, its pool and the node
//! placement chose. Pure: no API calls. The template hash covers everything
//! but the node, so that a spec change (and only a spec change) rolls pods.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    EnvVarSource, HTTPGetAction, ImageVolumeSource, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretEnvSource, SecretVolumeSource, SecurityContext,
    Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use strata_crds::model::{Model, PoolPreference};

use crate::engine::{self, MODEL_DIR, SourceKind};
use crate::labels;

/// Port the sidecar serves the OpenAI API on (the pod's front door).
pub const SIDECAR_HTTP_PORT: i32 = 8080;
/// Port of the sidecar's /metrics, /healthz, /readyz and adapter API.
pub const SIDECAR_ADMIN_PORT: i32 = 9090;
/// Where the sidecar mounts its Model's Secret (adapter API token, admin
/// port certificate and key, CA certificate).
pub const SIDECAR_SECRET_DIR: &str = "/var/run/strata/sidecar";
/// The key of the token in its Secret.
pub const ADAPTER_TOKEN_KEY: &str = "token";
/// Where fetched adapters live, in the sidecar and the engine.
pub const ADAPTERS_DIR: &str = "/adapters";
/// Key of the CA certificate (PEM), in the CA Secret and in each Model's Secret.
pub const CA_CERT_KEY: &str = "ca.crt";
/// Key of a sidecar's certificate (PEM) in its Model's Secret.
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Key of a sidecar's private key (PEM, PKCS#8) in its Model's Secret.
pub const TLS_KEY_KEY: &str = "tls.key";
/// Every sidecar name is under this domain (the operator's CA is
/// constrained to it).
pub const SIDECAR_DOMAIN: &str = "sidecar.strata.internal";

/// The Secret of a Model's replicas (every Model has one): the adapter API
/// token and the sidecars' admin port certificate (keys below).
/// The name predates the certificate.
pub fn adapter_token_secret(model: &str) -> String {
    format!("{model}-adapter-token")
}

/// The TLS server name of a Model's sidecars: the only name in their
/// certificate and what the operator verifies (never resolved; pod IPs are
/// unknown when the certificate is made).
/// `<model>.<namespace>.sidecar.strata.internal`, or, where that is not a
/// valid DNS name (a label over 63 characters, over 253 in all),
/// `m-<hash of namespace/model>.<namespace>.sidecar.strata.internal`.
pub fn sidecar_server_name(namespace: &str, model: &str) -> String {
    let name = format!("{model}.{namespace}.{}", SIDECAR_DOMAIN);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() <= 253 && name.split('.').all(label_ok) {
        return name;
    }
    format!(
        "m-{:016x}.{namespace}.{}",
        fnv1a(format!("{namespace}/{model}").as_bytes()),
        SIDECAR_DOMAIN
    )
}
/// Image of the init container that copies s3:// and gs:// weights.
pub const FETCH_IMAGE: &str = "docker.io/rclone/rclone:1.71";

/// Operator-wide settings that shape every pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// Image of strata-sidecar.
    pub sidecar_image: String,
    /// Labels added to every model pod (e.g. for a service mesh or the local world's pod runner).
    pub extra_pod_labels: BTreeMap<String, String>,
}

/// Everything that decides one replica's pod.
#[derive(Debug, Clone)]
pub struct ReplicaTemplate<'a> {
    /// The Model.
    pub model: &'a Model,
    /// The pool preference the replica is placed under.
    pub pool: &'a PoolPreference,
    /// The pool's tolerations.
    pub tolerations: &'a [Toleration],
    /// The pool's GPU resource name.
    pub gpu_resource: &'a str,
    /// Operator settings.
    pub settings: &'a Settings,
}

/// Errors building a pod (the Model lacks something the API cannot check).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// The Model has no name, namespace or uid yet.
    #[error("the Model has no {0} (not yet persisted?)")]
    MissingMetadata(&'static str),
    /// The source URI is not one Strata understands.
    #[error("unsupported source {0:?}")]
    Source(String),
    /// No image for the engine.
    #[error("engine {0} needs engine.image")]
    NoImage(&'static str),
}

fn s(v: &str) -> String {
    v.to_string()
}

/// FNV-1a, 64 bit: a stable hash (unlike std's), so that an operator
/// upgrade does not roll every pod.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The name clients use for the Model.
pub fn served_name(model: &Model) -> String {
    model
        .spec
        .served_name
        .clone()
        .or_else(|| model.metadata.name.clone())
        .unwrap_or_default()
}

/// GPUs per replica on a pool.
pub fn gpus_on(model: &Model, pool: &PoolPreference) -> i64 {
    i64::from(pool.gpus_per_replica.unwrap_or(model.spec.gpus_per_replica))
}

impl ReplicaTemplate<'_> {
    /// The pod spec without the node: what the template hash covers.
    pub fn pod_spec(&self) -> Result<PodSpec, TemplateError> {
        let spec = &self.model.spec;
        let engine_type = spec.engine.engine_type;
        let image = spec
            .engine
            .image
            .clone()
            .or_else(|| engine::default_image(engine_type).map(str::to_string))
            .ok_or(TemplateError::NoImage(engine::kind_name(engine_type)))?;
        let source = engine::parse_source(&spec.source.uri)
            .ok_or_else(|| TemplateError::Source(spec.source.uri.clone()))?;
        let weights = engine::weights_location(&source);
        let port = spec
            .engine
            .port
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(engine::default_port(engine_type));
        let gpus = gpus_on(self.model, self.pool);
        let served = served_name(self.model);
        let (command, args) =
            engine::command_line(spec, Some(self.pool), &served, gpus, port, &weights);

        let security = spec.engine.security.clone().unwrap_or_default();
        let env = self.engine_env(&security, port);
        let env_from = spec.source.credentials_secret_ref.as_ref().map(|r| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: r.name.clone(),
                    optional: Some(false),
                }),
                ..EnvFromSource::default()
            }]
        });
        let (limits, requests) = self.engine_resources(gpus);

        let mut volumes = vec![Volume {
            name: s("dshm"),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some(s("Memory")),
                size_limit: spec
                    .engine
                    .resources
                    .as_ref()
                    .and_then(|r| r.shared_memory.clone()),
            }),
            ..Volume::default()
        }];
        let mut mounts = vec![VolumeMount {
            name: s("dshm"),
            mount_path: s("/dev/shm"),
            ..VolumeMount::default()
        }];
        if !security.run_as_root {
            volumes.push(Volume {
                name: s("cache"),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            });
            mounts.push(VolumeMount {
                name: s("cache"),
                mount_path: s(CACHE_DIR),
                ..VolumeMount::default()
            });
        }
        let init_containers = weights_volume(&source, env_from.as_ref(), &mut volumes, &mut mounts);

        if spec.adapters.is_some() {
            // Adapters the sidecar fetched (the volume is declared with the sidecar).
            mounts.push(VolumeMount {
                name: s("adapters"),
                mount_path: s(ADAPTERS_DIR),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
        // Idle engine connections closed before the engine closes them,
        // where its environment changes when that is.
        let idle_timeout = engine::sidecar_idle_timeout(engine_type, &env);
        let engine_container = Container {
            name: s("engine"),
            image: Some(image),
            command,
            args: Some(args),
            env: (!env.is_empty()).then_some(env),
            env_from: env_from.clone(),
            resources: Some(ResourceRequirements {
                limits: Some(limits),
                requests: Some(requests),
                claims: None,
            }),
            volume_mounts: Some(mounts),
            security_context: Some(engine_security(&security)),
            ..Container::default()
        };

        let sidecar = self.sidecar_container(port, &served, idle_timeout, &mut volumes);

        Ok(PodSpec {
            containers: vec![engine_container, sidecar],
            init_containers: (!init_containers.is_empty()).then_some(init_containers),
            volumes: Some(volumes),
            tolerations: (!self.tolerations.is_empty()).then(|| self.tolerations.to_vec()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(60),
            security_context: Some(PodSecurityContext {
                seccomp_profile: Some(SeccompProfile {
                    type_: s("RuntimeDefault"),
                    localhost_profile: None,
                }),
                // Volumes (the cache, fetched weights) writable by the engine's group.
                fs_group: (!security.run_as_root)
                    .then(|| security.run_as_user.unwrap_or(ENGINE_UID)),
                ..PodSecurityContext::default()
            }),
            ..PodSpec::default()
        })
    }

    /// The engine's environment: the Model's, then the pool's (overriding
    /// by name); a home and caches the engine's user can write unless it
    /// runs as root (the image's may belong to root) or the Model sets
    /// them; a custom engine's `PORT`.
    fn engine_env(&self, security: &strata_crds::model::EngineSecurity, port: u16) -> Vec<EnvVar> {
        let spec = &self.model.spec;
        let mut env: Vec<EnvVar> = spec.engine.env.clone();
        for e in &self.pool.env {
            env.retain(|x| x.name != e.name);
            env.push(e.clone());
        }
        if !security.run_as_root {
            for (k, v) in [
                ("HOME", CACHE_DIR.to_string()),
                ("XDG_CACHE_HOME", CACHE_DIR.to_string()),
                ("HF_HOME", format!("{CACHE_DIR}/huggingface")),
            ] {
                if !env.iter().any(|e| e.name == k) {
                    env.push(EnvVar {
                        name: s(k),
                        value: Some(v),
                        value_from: None,
                    });
                }
            }
        }
        if spec.engine.engine_type == strata_crds::model::EngineType::Custom {
            env.push(EnvVar {
                name: s("PORT"),
                value: Some(port.to_string()),
                value_from: None,
            });
        }
        env
    }

    /// The engine's limits and requests: `gpus` GPUs (both), the Model's
    /// CPU (requested) and memory (requested and the limit).
    fn engine_resources(
        &self,
        gpus: i64,
    ) -> (BTreeMap<String, Quantity>, BTreeMap<String, Quantity>) {
        let mut limits =
            BTreeMap::from([(self.gpu_resource.to_string(), Quantity(gpus.to_string()))]);
        let mut requests = limits.clone();
        if let Some(r) = &self.model.spec.engine.resources {
            for (k, v) in [("cpu", &r.cpu), ("memory", &r.memory)] {
                if let Some(q) = v {
                    requests.insert(s(k), q.clone());
                    if k == "memory" {
                        limits.insert(s(k), q.clone());
                    }
                }
            }
        }
        (limits, requests)
    }

    /// The sidecar container, in front of the engine on `port`; the volumes
    /// it needs (the Model's Secret, the adapters' directory) are added to
    /// `volumes`.
    fn sidecar_container(
        &self,
        port: u16,
        served: &str,
        idle_timeout: Option<f64>,
        volumes: &mut Vec<Volume>,
    ) -> Container {
        let spec = &self.model.spec;
        let engine_type = spec.engine.engine_type;
        let mut sidecar_args = vec![
            format!("--listen=0.0.0.0:{SIDECAR_HTTP_PORT}"),
            format!("--admin-listen=0.0.0.0:{SIDECAR_ADMIN_PORT}"),
            format!("--engine-url=http://127.0.0.1:{port}"),
            format!("--engine={}", engine::kind_name(engine_type)),
            format!("--engine-health-path={}", engine::health_path(engine_type)),
            format!("--served-model={served}"),
        ];
        if let Some(t) = idle_timeout {
            sidecar_args.push(format!("--engine-idle-timeout={t}"));
        }
        // The Model's Secret: the admin port's certificate (the operator
        // calls it over TLS) and, for adapters, the operator's token.
        volumes.push(Volume {
            name: s("sidecar-secret"),
            secret: Some(SecretVolumeSource {
                secret_name: Some(adapter_token_secret(
                    self.model.metadata.name.as_deref().unwrap_or_default(),
                )),
                optional: Some(false),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        let mut sidecar_mounts = vec![VolumeMount {
            name: s("sidecar-secret"),
            mount_path: s(SIDECAR_SECRET_DIR),
            read_only: Some(true),
            ..VolumeMount::default()
        }];
        sidecar_args.push(format!(
            "--admin-tls-cert-file={SIDECAR_SECRET_DIR}/{}",
            TLS_CERT_KEY
        ));
        sidecar_args.push(format!(
            "--admin-tls-key-file={SIDECAR_SECRET_DIR}/{}",
            TLS_KEY_KEY
        ));
        if spec.adapters.is_some() {
            // Without the token file the adapter API refuses every call.
            sidecar_args.push(format!(
                "--adapter-token-file={SIDECAR_SECRET_DIR}/{ADAPTER_TOKEN_KEY}"
            ));
            // Adapters fetched by the sidecar with their own credentials,
            // loaded by the engine from there.
            volumes.push(Volume {
                name: s("adapters"),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            });
            sidecar_mounts.push(VolumeMount {
                name: s("adapters"),
                mount_path: s(ADAPTERS_DIR),
                ..VolumeMount::default()
            });
            sidecar_args.push(format!("--adapter-dir={ADAPTERS_DIR}"));
        }
        Container {
            name: s("strata-sidecar"),
            image: Some(self.settings.sidecar_image.clone()),
            args: Some(sidecar_args),
            volume_mounts: Some(sidecar_mounts),
            env: Some(vec![
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
            ]),
            ports: Some(vec![
                ContainerPort {
                    name: Some(s("http")),
                    container_port: SIDECAR_HTTP_PORT,
                    protocol: Some(s("TCP")),
                    ..ContainerPort::default()
                },
                ContainerPort {
                    name: Some(s("admin")),
                    container_port: SIDECAR_ADMIN_PORT,
                    protocol: Some(s("TCP")),
                    ..ContainerPort::default()
                },
            ]),
            readiness_probe: Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some(s("/readyz")),
                    port: IntOrString::String(s("admin")),
                    // The kubelet does not verify the certificate.
                    scheme: Some(s("HTTPS")),
                    ..HTTPGetAction::default()
                }),
                period_seconds: Some(5),
                failure_threshold: Some(3),
                timeout_seconds: Some(2),
                ..Probe::default()
            }),
            liveness_probe: Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some(s("/healthz")),
                    port: IntOrString::String(s("admin")),
                    // The kubelet does not verify the certificate.
                    scheme: Some(s("HTTPS")),
                    ..HTTPGetAction::default()
                }),
                period_seconds: Some(10),
                failure_threshold: Some(6),
                timeout_seconds: Some(2),
                ..Probe::default()
            }),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    (s("cpu"), Quantity(s("100m"))),
                    (s("memory"), Quantity(s("64Mi"))),
                ])),
                limits: Some(BTreeMap::from([(s("memory"), Quantity(s("256Mi")))])),
                claims: None,
            }),
            security_context: Some(hardened()),
            ..Container::default()
        }
    }

    /// The template hash: 10 hex digits of FNV-1a over the node-free pod spec.
    pub fn hash(&self) -> Result<String, TemplateError> {
        let spec = self.pod_spec()?;
        let json = serde_json::to_vec(&(&spec, &self.pool.name)).unwrap_or_default();
        Ok(format!("{:010x}", fnv1a(&json) & 0xff_ffff_ffff))
    }

    /// Labels of the replica's pods (and the selector of its Service, minus pool and hash).
    pub fn labels(&self, hash: &str) -> BTreeMap<String, String> {
        let name = self.model.metadata.name.clone().unwrap_or_default();
        let mut l = self.settings.extra_pod_labels.clone();
        l.extend(model_selector(&name));
        l.insert(s(labels::APP_NAME), s("strata-model"));
        l.insert(s(labels::APP_COMPONENT), s("inference"));
        l.insert(s(labels::MANAGED_BY), s(labels::MANAGER));
        l.insert(s(labels::POOL), self.pool.name.clone());
        l.insert(s(labels::TEMPLATE_HASH), s(hash));
        l
    }

    /// The full pod for a replica on `node`.
    pub fn pod(&self, node: &str) -> Result<Pod, TemplateError> {
        let meta = &self.model.metadata;
        let name = meta
            .name
            .clone()
            .ok_or(TemplateError::MissingMetadata("name"))?;
        let namespace = meta
            .namespace
            .clone()
            .ok_or(TemplateError::MissingMetadata("namespace"))?;
        let uid = meta
            .uid
            .clone()
            .ok_or(TemplateError::MissingMetadata("uid"))?;
        let hash = self.hash()?;
        let mut spec = self.pod_spec()?;
        spec.affinity = Some(Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_fields: Some(vec![NodeSelectorRequirement {
                            key: s("metadata.name"),
                            operator: s("In"),
                            values: Some(vec![s(node)]),
                        }]),
                        match_expressions: None,
                    }],
                }),
                preferred_during_scheduling_ignored_during_execution: None,
            }),
            ..Affinity::default()
        });
        Ok(Pod {
            metadata: ObjectMeta {
                generate_name: Some(format!("{name}-{}-", &hash[..8.min(hash.len())])),
                namespace: Some(namespace),
                labels: Some(self.labels(&hash)),
                annotations: Some(BTreeMap::from([(
                    s(labels::GPUS),
                    gpus_on(self.model, self.pool).to_string(),
                )])),
                owner_references: Some(vec![controller_ref("Model", &name, &uid)]),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
            status: None,
        })
    }
}

/// The volume that holds the weights, where they are not downloaded by the
/// engine itself (`hf://`), mounted read-only at [`MODEL_DIR`] in the
/// engine: the claim, the image volume, or an emptyDir that an init
/// container fills from the bucket (with the Model's credentials). The
/// init containers are returned.
fn weights_volume(
    source: &SourceKind,
    env_from: Option<&Vec<EnvFromSource>>,
    volumes: &mut Vec<Volume>,
    mounts: &mut Vec<VolumeMount>,
) -> Vec<Container> {
    let volume = |v: Volume| Volume {
        name: s("model"),
        ..v
    };
    let (model, init) = match source {
        SourceKind::Hf { .. } => return Vec::new(),
        SourceKind::Pvc { claim, .. } => (
            volume(Volume {
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: Some(true),
                }),
                ..Volume::default()
            }),
            None,
        ),
        SourceKind::Oci { reference } => (
            volume(Volume {
                image: Some(ImageVolumeSource {
                    reference: Some(reference.clone()),
                    pull_policy: Some(s("IfNotPresent")),
                }),
                ..Volume::default()
            }),
            None,
        ),
        SourceKind::Bucket { uri } => {
            // rclone reads credentials from the standard AWS_* / GOOGLE_* variables.
            let remote = if let Some(rest) = uri.strip_prefix("s3://") {
                format!(":s3,env_auth=true:{rest}")
            } else {
                format!(":gcs,env_auth=true:{}", uri.trim_start_matches("gs://"))
            };
            let fetch = Container {
                name: s("fetch-weights"),
                image: Some(s(FETCH_IMAGE)),
                args: Some(vec![s("copy"), remote, s(MODEL_DIR), s("--transfers=16")]),
                env_from: env_from.cloned(),
                volume_mounts: Some(vec![VolumeMount {
                    name: s("model"),
                    mount_path: s(MODEL_DIR),
                    ..VolumeMount::default()
                }]),
                security_context: Some(hardened()),
                ..Container::default()
            };
            (
                volume(Volume {
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                }),
                Some(fetch),
            )
        }
    };
    volumes.push(model);
    mounts.push(VolumeMount {
        name: s("model"),
        mount_path: s(MODEL_DIR),
        read_only: Some(true),
        ..VolumeMount::default()
    });
    init.into_iter().collect()
}

/// A name for a pod whose `metadata.generateName` is `prefix`, as the API
/// server would make it (the prefix cut to 58 bytes, then five characters
/// of its alphabet, which has no vowels), from five random bytes. The
/// operator names its replicas itself: it records a creation before the
/// request is sent, so the name must be known then. Pure.
pub fn pod_name(prefix: &str, random: [u8; 5]) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    const MAX_PREFIX: usize = 58;
    let mut end = prefix.len().min(MAX_PREFIX);
    while !prefix.is_char_boundary(end) {
        end -= 1;
    }
    let mut name = prefix[..end].to_string();
    name.extend(
        random
            .iter()
            .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()])),
    );
    name
}

/// The owner reference of an object Strata makes for one of its own (a
/// Model's pods, Service and token Secret; an Adapter's Service): deleting
/// the owner deletes it.
pub fn controller_ref(kind: &str, name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: s(strata_crds::API_VERSION),
        kind: s(kind),
        name: s(name),
        uid: s(uid),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The labels that select every pod of a Model.
pub fn model_selector(model: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (s(labels::MODEL), s(model)),
        (s(labels::APP_INSTANCE), s(model)),
    ])
}

/// The selector in string form (status.selector, for the scale subresource).
pub fn selector_string(model: &str) -> String {
    model_selector(model)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: s(name),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: s(path),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// The engine's UID unless the Model names one.
pub const ENGINE_UID: i64 = 1000;
/// The engine's home and caches (an emptyDir).
pub const CACHE_DIR: &str = "/cache";

/// The engine container's security context: Pod Security "restricted"
/// (non-root, no privilege escalation, no capabilities, the runtime's
/// seccomp profile), or, with runAsRoot, the image's user but still no
/// escalation. The root filesystem stays writable (engines write to /tmp).
pub fn engine_security(sec: &strata_crds::model::EngineSecurity) -> SecurityContext {
    let uid = sec.run_as_user.unwrap_or(ENGINE_UID);
    SecurityContext {
        allow_privilege_escalation: Some(false),
        run_as_non_root: (!sec.run_as_root).then_some(true),
        run_as_user: (!sec.run_as_root).then_some(uid),
        run_as_group: (!sec.run_as_root).then_some(uid),
        capabilities: (!sec.run_as_root).then(|| Capabilities {
            drop: Some(vec![s("ALL")]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: s("RuntimeDefault"),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

fn hardened() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(65532),
        capabilities: Some(Capabilities {
            drop: Some(vec![s("ALL")]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: s("RuntimeDefault"),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../samples/model-llama.yaml"
        ))
        .expect("sample");
        let v = strata_crds::validation::yaml_to_json(&text).expect("yaml");
        let mut m: Model = serde_json::from_value(v).expect("model");
        m.metadata.uid = Some("uid-1".into());
        m
    }

    fn settings() -> Settings {
        Settings {
            sidecar_image: "ghcr.io/strata-ai/strata-sidecar:test".into(),
            extra_pod_labels: BTreeMap::new(),
        }
    }

    fn engine_pod_spec(m: &Model) -> PodSpec {
        let s = settings();
        ReplicaTemplate {
            model: m,
            pool: &m.spec.pools[0],
            tolerations: &[],
            gpu_resource: "nvidia.com/gpu",
            settings: &s,
        }
        .pod_spec()
        .expect("spec")
    }

    #[test]
    fn the_engine_runs_restricted_unless_the_model_says_root() {
        let m = model();
        let spec = engine_pod_spec(&m);
        let engine = &spec.containers[0];
        let sc = engine.security_context.clone().expect("security context");
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.run_as_user, Some(ENGINE_UID));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_string()])
        );
        let env: Vec<_> = engine
            .env
            .iter()
            .flatten()
            .map(|e| e.name.as_str())
            .collect();
        assert!(env.contains(&"HOME") && env.contains(&"HF_HOME"), "{env:?}");
        assert!(
            engine
                .volume_mounts
                .iter()
                .flatten()
                .any(|v| v.mount_path == CACHE_DIR)
        );
        assert_eq!(
            spec.security_context.and_then(|p| p.fs_group),
            Some(ENGINE_UID)
        );

        let mut root = model();
        root.spec.engine.security = Some(strata_crds::model::EngineSecurity {
            run_as_user: None,
            run_as_root: true,
        });
        let spec = engine_pod_spec(&root);
        let sc = spec.containers[0].security_context.clone().expect("sc");
        assert_eq!((sc.run_as_non_root, sc.run_as_user), (None, None));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert!(
            !spec.containers[0]
                .env
                .iter()
                .flatten()
                .any(|e| e.name == "HOME")
        );
    }

    #[test]
    fn builds_the_replica_pod() {
        let m = model();
        let s = settings();
        let tol = vec![Toleration {
            key: Some("nvidia.com/gpu".into()),
            operator: Some("Exists".into()),
            ..Toleration::default()
        }];
        let l4 = &m.spec.pools[1];
        let t = ReplicaTemplate {
            model: &m,
            pool: l4,
            tolerations: &tol,
            gpu_resource: "nvidia.com/gpu",
            settings: &s,
        };
        let pod = t.pod("l4-0").expect("pod");
        let spec = pod.spec.expect("spec");
        let engine = &spec.containers[0];
        let args = engine.args.clone().unwrap_or_default();
        assert!(
            args.windows(2)
                .any(|w| w == ["--model", "meta-llama/Llama-3.1-8B-Instruct"]),
            "{args:?}"
        );
        assert!(
            args.windows(2).any(|w| w == ["--max-model-len", "8192"]),
            "pool args appended: {args:?}"
        );
        assert!(
            args.windows(2).any(|w| w == ["--host", "127.0.0.1"]),
            "the engine listens on loopback only"
        );
        assert_eq!(
            engine
                .resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .and_then(|l| l.get("nvidia.com/gpu"))
                .map(|q| q.0.as_str()),
            Some("1")
        );
        assert_eq!(
            engine
                .env_from
                .as_ref()
                .and_then(|e| e[0].secret_ref.as_ref())
                .map(|s| s.name.as_str()),
            Some("hf-token")
        );
        let sidecar = &spec.containers[1];
        // The admin port serves TLS with the Model's certificate; the probes
        // speak HTTPS to it.
        let sargs = sidecar.args.clone().unwrap_or_default();
        for a in [
            "--admin-tls-cert-file=/var/run/strata/sidecar/tls.crt",
            "--admin-tls-key-file=/var/run/strata/sidecar/tls.key",
            "--adapter-token-file=/var/run/strata/sidecar/token",
        ] {
            assert!(sargs.iter().any(|x| x == a), "{a} in {sargs:?}");
        }
        let secret_volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "sidecar-secret")
            .and_then(|v| v.secret.as_ref())
            .expect("the Model's Secret as a volume");
        assert_eq!(
            secret_volume.secret_name.as_deref(),
            Some("llama-3-1-8b-adapter-token")
        );
        assert!(
            sidecar
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == "sidecar-secret"
                    && m.mount_path == SIDECAR_SECRET_DIR
                    && m.read_only == Some(true))
        );
        for probe in [&sidecar.readiness_probe, &sidecar.liveness_probe] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .expect("an HTTP probe");
            assert_eq!(get.scheme.as_deref(), Some("HTTPS"));
            assert_eq!(get.port, IntOrString::String("admin".into()));
        }
        assert!(
            !engine
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == "sidecar-secret"),
            "the engine does not see the sidecar's key"
        );
        let sc = sidecar.security_context.clone().expect("hardened");
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert!(sidecar.readiness_probe.is_some());
        let affinity = serde_json::to_string(&spec.affinity).expect("json");
        assert!(
            affinity.contains("l4-0") && affinity.contains("metadata.name"),
            "{affinity}"
        );
        assert_eq!(spec.tolerations.map(|t| t.len()), Some(1));
        let labels = pod.metadata.labels.expect("labels");
        assert_eq!(
            labels.get(labels::MODEL).map(String::as_str),
            Some("llama-3-1-8b")
        );
        assert_eq!(labels.get(labels::POOL).map(String::as_str), Some("l4"));
        let owner = &pod.metadata.owner_references.expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("Model", Some(true))
        );
    }

    #[test]
    fn the_sidecar_follows_vllms_keep_alive_from_the_engine_environment() {
        use k8s_openapi::api::core::v1::EnvVar;
        let idle_args = |m: &Model| -> Vec<String> {
            engine_pod_spec(m).containers[1]
                .args
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter(|a| a.starts_with("--engine-idle-timeout"))
                .collect()
        };
        let keep_alive = |v: &str| EnvVar {
            name: "VLLM_HTTP_TIMEOUT_KEEP_ALIVE".into(),
            value: Some(v.into()),
            value_from: None,
        };
        let mut m = model();
        assert_eq!(
            m.spec.engine.engine_type,
            strata_crds::model::EngineType::VLlm
        );
        assert!(idle_args(&m).is_empty(), "vLLM's default: the sidecar's");
        m.spec.engine.env.push(keep_alive("30"));
        assert_eq!(idle_args(&m), ["--engine-idle-timeout=29"]);
        // The pool's environment overrides the Model's.
        m.spec.pools[0].env.push(keep_alive("2"));
        assert_eq!(idle_args(&m), ["--engine-idle-timeout=1.6"]);
    }

    #[test]
    fn a_model_without_adapters_still_gets_admin_tls() {
        let mut m = model();
        m.spec.adapters = None;
        let s = settings();
        let t = ReplicaTemplate {
            model: &m,
            pool: &m.spec.pools[0],
            tolerations: &[],
            gpu_resource: "nvidia.com/gpu",
            settings: &s,
        };
        let spec = t.pod_spec().expect("spec");
        let sidecar = &spec.containers[1];
        let args = sidecar.args.clone().unwrap_or_default();
        assert!(
            args.iter().any(|a| a.starts_with("--admin-tls-cert-file="))
                && args.iter().any(|a| a.starts_with("--admin-tls-key-file=")),
            "{args:?}"
        );
        assert!(
            !args.iter().any(|a| a.starts_with("--adapter-token-file=")),
            "no adapter API without adapters: {args:?}"
        );
        assert!(
            spec.volumes
                .iter()
                .flatten()
                .any(|v| v.name == "sidecar-secret")
        );
    }

    #[test]
    fn sidecar_server_names_are_valid_dns_names_per_model() {
        assert_eq!(
            sidecar_server_name("default", "llama-3-1-8b"),
            "llama-3-1-8b.default.sidecar.strata.internal"
        );
        assert_ne!(
            sidecar_server_name("a", "m"),
            sidecar_server_name("b", "m"),
            "namespaces differ"
        );
        // A name too long for one DNS label: a hash, still per Model.
        let long = "x".repeat(80);
        let n = sidecar_server_name("default", &long);
        assert!(
            n.starts_with("m-") && n.ends_with(".default.sidecar.strata.internal"),
            "{n}"
        );
        assert!(n.split('.').all(|l| l.len() <= 63) && n.len() <= 253);
        assert_eq!(n, sidecar_server_name("default", &long), "stable");
        assert_ne!(n, sidecar_server_name("default", &"y".repeat(80)));
        assert!(rustls::pki_types::ServerName::try_from(n.as_str()).is_ok());
        // A Model name with dots is still a valid name.
        assert!(
            rustls::pki_types::ServerName::try_from(sidecar_server_name("ns", "llama.v2").as_str())
                .is_ok()
        );
    }

    #[test]
    fn the_hash_is_stable_and_follows_the_template() {
        let m = model();
        let s = settings();
        let h100 = &m.spec.pools[0];
        let l4 = &m.spec.pools[1];
        let t = |pool| ReplicaTemplate {
            model: &m,
            pool,
            tolerations: &[],
            gpu_resource: "nvidia.com/gpu",
            settings: &s,
        };
        let a = t(h100).hash().expect("hash");
        assert_eq!(a, t(h100).hash().expect("hash"), "deterministic");
        assert_ne!(a, t(l4).hash().expect("hash"), "pools differ");
        assert_eq!(a.len(), 10);
        let pod_a = t(h100).pod("h100-0").expect("pod");
        let pod_b = t(h100).pod("h100-1").expect("pod");
        assert_eq!(
            pod_a
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(labels::TEMPLATE_HASH).cloned()),
            Some(a.clone())
        );
        assert_eq!(
            pod_a.metadata.labels, pod_b.metadata.labels,
            "the node is not in the hash"
        );
        let mut changed = m.clone();
        changed.spec.engine.args.push("--enforce-eager".into());
        let b = ReplicaTemplate {
            model: &changed,
            pool: &changed.spec.pools[0],
            tolerations: &[],
            gpu_resource: "nvidia.com/gpu",
            settings: &s,
        }
        .hash()
        .expect("hash");
        assert_ne!(a, b, "a spec change rolls pods");
        // FNV-1a test vectors: the hash must never change between releases.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn pod_names_are_made_as_the_api_server_makes_them() {
        assert_eq!(
            pod_name("chat-0123abcd-", [0, 1, 2, 26, 27]),
            "chat-0123abcd-bcd9b"
        );
        let long = format!("{}-", "m".repeat(70));
        let n = pod_name(&long, [255; 5]);
        assert_eq!(n.len(), 63);
        assert!(n.starts_with(&"m".repeat(58)));
        assert!(
            n[58..]
                .bytes()
                .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b))
        );
    }
}
