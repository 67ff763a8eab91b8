//! What each inference engine needs: image, command line, port, health path.
//! Pure: from the Model's engine settings, source and the replica's pool
//! overrides to the engine container's command, arguments and environment.

use strata_crds::model::{EngineType, ModelSpec, PoolPreference};

/// Where the weights are mounted when they are not fetched by the engine itself.
pub const MODEL_DIR: &str = "/models";

/// Default images, pinned. A Model's engine.image overrides them.
pub fn default_image(engine: EngineType) -> Option<&'static str> {
    match engine {
        EngineType::VLlm => Some("docker.io/vllm/vllm-openai:v0.11.0"),
        EngineType::SgLang => Some("docker.io/lmsysorg/sglang:v0.5.3-cu126"),
        EngineType::Tgi => Some("ghcr.io/huggingface/text-generation-inference:3.3.6"),
        EngineType::LlamaCpp => Some("ghcr.io/ggml-org/llama.cpp:server-cuda-b6700"),
        EngineType::Custom => None,
    }
}

/// Default port of each engine (inside the pod, on loopback).
pub fn default_port(engine: EngineType) -> u16 {
    match engine {
        EngineType::VLlm => 8000,
        EngineType::SgLang => 30000,
        EngineType::Tgi => 3000,
        EngineType::LlamaCpp => 8081,
        EngineType::Custom => 8000,
    }
}

/// The engine's own health endpoint (the sidecar's readiness follows it).
pub fn health_path(engine: EngineType) -> &'static str {
    match engine {
        EngineType::VLlm
        | EngineType::SgLang
        | EngineType::Tgi
        | EngineType::LlamaCpp
        | EngineType::Custom => "/health",
    }
}

/// Short name of the engine, as the sidecar's --engine flag takes it.
pub fn kind_name(engine: EngineType) -> &'static str {
    match engine {
        EngineType::VLlm => "vllm",
        EngineType::SgLang => "sglang",
        EngineType::Tgi => "tgi",
        EngineType::LlamaCpp => "llamacpp",
        EngineType::Custom => "custom",
    }
}

/// The sidecar's idle timeout for its connections to the engine
/// (`--engine-idle-timeout`, seconds), where the engine's environment
/// changes how long the engine keeps an idle connection: vLLM's HTTP server
/// (uvicorn) closes one after `VLLM_HTTP_TIMEOUT_KEEP_ALIVE` seconds (5 by
/// default, which the sidecar's default of 4 s already stays below). The
/// sidecar must close first, so it gets a second less (a fifth less below
/// 5 s). None: the sidecar's default (no such variable, a value from a
/// Secret or ConfigMap the operator cannot read, not a positive number,
/// another engine: SGLang's uvicorn and llama.cpp's server close after 5 s,
/// TGI's server never).
pub fn sidecar_idle_timeout(
    engine: EngineType,
    env: &[k8s_openapi::api::core::v1::EnvVar],
) -> Option<f64> {
    if engine != EngineType::VLlm {
        return None;
    }
    let value = env
        .iter()
        .rev()
        .find(|e| e.name == "VLLM_HTTP_TIMEOUT_KEEP_ALIVE")?
        .value
        .as_deref()?;
    let secs: f64 = value.trim().parse().ok()?;
    if !secs.is_finite() || secs <= 0.0 || secs > 86_400.0 {
        return None;
    }
    // vLLM's default is what the sidecar's own default is made for.
    (secs != VLLM_DEFAULT_KEEP_ALIVE_SECONDS).then_some(secs - (secs / 5.0).min(1.0))
}

/// vLLM's `VLLM_HTTP_TIMEOUT_KEEP_ALIVE` when unset (uvicorn's own default);
/// the sidecar's default `--engine-idle-timeout`, 4 s, is what
/// [`sidecar_idle_timeout`] gives for it.
const VLLM_DEFAULT_KEEP_ALIVE_SECONDS: f64 = 5.0;

/// How the weights reach the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsLocation {
    /// The engine downloads from the Hugging Face Hub itself.
    HuggingFace {
        /// `<organization>/<repository>`.
        repo: String,
        /// Revision, if pinned.
        revision: Option<String>,
    },
    /// A directory in the pod (a mounted claim, image volume or download).
    Path(String),
}

/// A parsed source URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// hf://org/repo[@rev]
    Hf {
        /// org/repo.
        repo: String,
        /// Revision.
        revision: Option<String>,
    },
    /// s3:// or gs://: fetched by an init container into an emptyDir.
    Bucket {
        /// The full URI.
        uri: String,
    },
    /// pvc://claim/path
    Pvc {
        /// Claim name.
        claim: String,
        /// Path inside the claim.
        path: String,
    },
    /// oci://reference: mounted as an image volume.
    Oci {
        /// Image reference without the scheme.
        reference: String,
    },
}

/// Parses a source URI already validated by the CRD.
pub fn parse_source(uri: &str) -> Option<SourceKind> {
    if let Some(rest) = uri.strip_prefix("hf://") {
        let (repo, revision) = match rest.split_once('@') {
            Some((r, rev)) => (r.to_string(), Some(rev.to_string())),
            None => (rest.to_string(), None),
        };
        return Some(SourceKind::Hf { repo, revision });
    }
    if uri.starts_with("s3://") || uri.starts_with("gs://") {
        return Some(SourceKind::Bucket {
            uri: uri.to_string(),
        });
    }
    if let Some(rest) = uri.strip_prefix("pvc://") {
        let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
        return Some(SourceKind::Pvc {
            claim: claim.to_string(),
            path: path.trim_matches('/').to_string(),
        });
    }
    if let Some(rest) = uri.strip_prefix("oci://") {
        return Some(SourceKind::Oci {
            reference: rest.to_string(),
        });
    }
    None
}

/// Where the engine finds the weights for a source.
pub fn weights_location(source: &SourceKind) -> WeightsLocation {
    match source {
        SourceKind::Hf { repo, revision } => WeightsLocation::HuggingFace {
            repo: repo.clone(),
            revision: revision.clone(),
        },
        SourceKind::Bucket { .. } | SourceKind::Oci { .. } => {
            WeightsLocation::Path(MODEL_DIR.to_string())
        }
        SourceKind::Pvc { path, .. } if path.is_empty() => {
            WeightsLocation::Path(MODEL_DIR.to_string())
        }
        SourceKind::Pvc { path, .. } => WeightsLocation::Path(format!("{MODEL_DIR}/{path}")),
    }
}

/// Flag names of an engine that takes vLLM-like arguments.
struct ServerFlags {
    model: &'static str,
    parallel: &'static str,
    max_loras: &'static str,
}

/// Arguments shared by vLLM and SGLang: model, loopback host and port,
/// served name, tensor parallelism, revision and LoRA limits.
#[allow(clippy::too_many_arguments)]
fn openai_server_args(
    prefix: &[&str],
    flags: ServerFlags,
    model_ref: String,
    served_name: &str,
    port: u16,
    gpus: i64,
    revision: Option<String>,
    spec: &ModelSpec,
) -> Vec<String> {
    let s = |v: &str| v.to_string();
    let mut a: Vec<String> = prefix.iter().map(|p| s(p)).collect();
    a.extend([
        s(flags.model),
        model_ref,
        s("--host"),
        s("127.0.0.1"),
        s("--port"),
        port.to_string(),
        s("--served-model-name"),
        s(served_name),
        s(flags.parallel),
        gpus.to_string(),
    ]);
    if let Some(rev) = revision {
        a.extend([s("--revision"), rev]);
    }
    if let Some(limits) = &spec.adapters {
        a.extend([
            s("--enable-lora"),
            s(flags.max_loras),
            limits.max_per_replica.to_string(),
            s("--max-lora-rank"),
            limits.max_rank.to_string(),
        ]);
    }
    a
}

/// The engine container's command (None: the image's entrypoint) and arguments.
pub fn command_line(
    spec: &ModelSpec,
    pool: Option<&PoolPreference>,
    served_name: &str,
    gpus: i64,
    port: u16,
    weights: &WeightsLocation,
) -> (Option<Vec<String>>, Vec<String>) {
    let model_ref = match weights {
        WeightsLocation::HuggingFace { repo, .. } => repo.clone(),
        WeightsLocation::Path(p) => p.clone(),
    };
    let revision = match weights {
        WeightsLocation::HuggingFace { revision, .. } => revision.clone(),
        WeightsLocation::Path(_) => None,
    };
    let s = |v: &str| v.to_string();
    let (command, mut args) = match spec.engine.engine_type {
        EngineType::VLlm => (
            None,
            openai_server_args(
                &[],
                ServerFlags {
                    model: "--model",
                    parallel: "--tensor-parallel-size",
                    max_loras: "--max-loras",
                },
                model_ref,
                served_name,
                port,
                gpus,
                revision,
                spec,
            ),
        ),
        EngineType::SgLang => (
            Some(vec![s("python3")]),
            openai_server_args(
                &["-m", "sglang.launch_server"],
                ServerFlags {
                    model: "--model-path",
                    parallel: "--tp",
                    max_loras: "--max-loras-per-batch",
                },
                model_ref,
                served_name,
                port,
                gpus,
                revision,
                spec,
            ),
        ),
        EngineType::Tgi => {
            let mut a = vec![
                s("--model-id"),
                model_ref,
                s("--hostname"),
                s("127.0.0.1"),
                s("--port"),
                port.to_string(),
                s("--num-shard"),
                gpus.to_string(),
            ];
            if let Some(rev) = revision {
                a.extend([s("--revision"), rev]);
            }
            (None, a)
        }
        EngineType::LlamaCpp => {
            let mut a = match weights {
                WeightsLocation::HuggingFace { repo, .. } => vec![s("--hf-repo"), repo.clone()],
                WeightsLocation::Path(p) => vec![s("--model"), p.clone()],
            };
            a.extend([
                s("--host"),
                s("127.0.0.1"),
                s("--port"),
                port.to_string(),
                s("--alias"),
                s(served_name),
                s("--n-gpu-layers"),
                s("999"),
            ]);
            (None, a)
        }
        EngineType::Custom => (None, Vec::new()),
    };
    args.extend(spec.engine.args.iter().cloned());
    if let Some(p) = pool {
        args.extend(p.args.iter().cloned());
    }
    (command, args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_and_sglang_get_their_own_flag_names() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../samples/model-llama.yaml"
        ))
        .expect("sample");
        let mut m: strata_crds::Model =
            serde_json::from_value(strata_crds::validation::yaml_to_json(&text).expect("yaml"))
                .expect("model");
        let w = WeightsLocation::HuggingFace {
            repo: "org/m".into(),
            revision: Some("v1".into()),
        };
        let (cmd, args) = command_line(&m.spec, None, "m", 2, 8000, &w);
        assert_eq!(cmd, None);
        assert_eq!(
            args[..17].join(" "),
            "--model org/m --host 127.0.0.1 --port 8000 --served-model-name m --tensor-parallel-size 2 --revision v1 --enable-lora --max-loras 4 --max-lora-rank 16"
        );
        m.spec.engine.engine_type = EngineType::SgLang;
        let (cmd, args) = command_line(&m.spec, None, "m", 2, 30000, &w);
        assert_eq!(cmd, Some(vec!["python3".to_string()]));
        assert_eq!(
            args[..19].join(" "),
            "-m sglang.launch_server --model-path org/m --host 127.0.0.1 --port 30000 --served-model-name m --tp 2 --revision v1 --enable-lora --max-loras-per-batch 4 --max-lora-rank 16"
        );
    }

    #[test]
    fn parses_every_source_scheme() {
        assert_eq!(
            parse_source("hf://meta-llama/Llama-3.1-8B@main"),
            Some(SourceKind::Hf {
                repo: "meta-llama/Llama-3.1-8B".into(),
                revision: Some("main".into())
            })
        );
        assert_eq!(
            parse_source("s3://bucket/x"),
            Some(SourceKind::Bucket {
                uri: "s3://bucket/x".into()
            })
        );
        assert_eq!(
            parse_source("pvc://models/llama/8b/"),
            Some(SourceKind::Pvc {
                claim: "models".into(),
                path: "llama/8b".into()
            })
        );
        assert_eq!(
            parse_source("oci://ghcr.io/acme/llama:v1"),
            Some(SourceKind::Oci {
                reference: "ghcr.io/acme/llama:v1".into()
            })
        );
        assert_eq!(parse_source("https://x"), None);
        assert_eq!(
            weights_location(&SourceKind::Pvc {
                claim: "c".into(),
                path: "a/b".into()
            }),
            WeightsLocation::Path("/models/a/b".into())
        );
    }

    #[test]
    fn the_sidecar_closes_idle_engine_connections_before_vllm_does() {
        use k8s_openapi::api::core::v1::EnvVar;
        let env = |v: &str| {
            vec![EnvVar {
                name: "VLLM_HTTP_TIMEOUT_KEEP_ALIVE".into(),
                value: Some(v.into()),
                value_from: None,
            }]
        };
        let t = |e: EngineType, v: &str| sidecar_idle_timeout(e, &env(v));
        assert_eq!(t(EngineType::VLlm, "60"), Some(59.0));
        assert_eq!(t(EngineType::VLlm, "2"), Some(1.6));
        assert_eq!(t(EngineType::VLlm, " 1 "), Some(0.8));
        // vLLM's default, or anything the sidecar's default stays below.
        assert_eq!(t(EngineType::VLlm, "5"), None);
        for bad in ["", "x", "0", "-3", "inf", "NaN", "1e9"] {
            assert_eq!(t(EngineType::VLlm, bad), None, "{bad:?}");
        }
        assert_eq!(t(EngineType::SgLang, "60"), None);
        assert_eq!(sidecar_idle_timeout(EngineType::VLlm, &[]), None);
        // The last of two wins, as in a container's environment.
        let mut two = env("60");
        two.extend(env("3"));
        assert_eq!(sidecar_idle_timeout(EngineType::VLlm, &two), Some(2.4));
    }
}
