//! What differs between engines: metric names and the adapter API.

use crate::promtext::{self, Sample};

/// The engine behind the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// vLLM.
    Vllm,
    /// SGLang.
    Sglang,
    /// Text Generation Inference.
    Tgi,
    /// llama.cpp's llama-server.
    Llamacpp,
    /// Anything serving the OpenAI API (read with vLLM's metric names).
    Custom,
}

/// The engine's load, as far as its metrics tell. None: unknown.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EngineStats {
    /// Requests waiting in the engine's queue.
    pub queue: Option<f64>,
    /// Requests being processed.
    pub running: Option<f64>,
    /// KV-cache use, 0 to 1.
    pub kv_cache: Option<f64>,
}

fn first(samples: &[Sample], names: &[&str], f: fn(&[Sample], &str) -> Option<f64>) -> Option<f64> {
    names.iter().find_map(|n| f(samples, n))
}

impl EngineKind {
    /// Reads queue, running and KV-cache use from the engine's metrics
    /// (vLLM's old and new names, SGLang, TGI, llama.cpp).
    pub fn stats(self, samples: &[Sample]) -> EngineStats {
        let (queue, running, kv): (&[&str], &[&str], &[&str]) = match self {
            Self::Vllm | Self::Custom => (
                &["vllm:num_requests_waiting"],
                &["vllm:num_requests_running"],
                &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
            ),
            Self::Sglang => (
                &["sglang:num_queue_reqs"],
                &["sglang:num_running_reqs"],
                &["sglang:token_usage"],
            ),
            Self::Tgi => (&["tgi_queue_size"], &["tgi_batch_current_size"], &[]),
            Self::Llamacpp => (
                &["llamacpp:requests_deferred"],
                &["llamacpp:requests_processing"],
                &["llamacpp:kv_cache_usage_ratio"],
            ),
        };
        EngineStats {
            queue: first(samples, queue, promtext::sum),
            running: first(samples, running, promtext::sum),
            kv_cache: first(samples, kv, promtext::mean).map(|v| v.clamp(0.0, 1.0)),
        }
    }

    /// Paths of the engine's load and unload adapter endpoints, if it has them.
    pub fn adapter_paths(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::Vllm | Self::Custom => Some(("/v1/load_lora_adapter", "/v1/unload_lora_adapter")),
            Self::Sglang => Some(("/load_lora_adapter", "/unload_lora_adapter")),
            Self::Tgi | Self::Llamacpp => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_engines_names() {
        let vllm_old = promtext::parse(
            "vllm:num_requests_waiting{model_name=\"m\"} 4\nvllm:num_requests_running{model_name=\"m\"} 2\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\n",
        );
        assert_eq!(
            EngineKind::Vllm.stats(&vllm_old),
            EngineStats {
                queue: Some(4.0),
                running: Some(2.0),
                kv_cache: Some(0.5)
            }
        );
        let vllm_new = promtext::parse("vllm:kv_cache_usage_perc{engine=\"0\"} 0.75\n");
        assert_eq!(EngineKind::Vllm.stats(&vllm_new).kv_cache, Some(0.75));
        let sglang = promtext::parse(
            "sglang:num_queue_reqs 3\nsglang:num_running_reqs 9\nsglang:token_usage 0.4\n",
        );
        assert_eq!(EngineKind::Sglang.stats(&sglang).queue, Some(3.0));
        let tgi = promtext::parse("tgi_queue_size 1\ntgi_batch_current_size 5\n");
        assert_eq!(
            EngineKind::Tgi.stats(&tgi),
            EngineStats {
                queue: Some(1.0),
                running: Some(5.0),
                kv_cache: None
            }
        );
        assert_eq!(
            EngineKind::Vllm.stats(&promtext::parse("garbage")),
            EngineStats::default()
        );
    }
}
