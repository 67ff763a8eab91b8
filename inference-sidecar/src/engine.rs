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

/// Largest plausible queue or batch of one engine.
pub const MAX_PLAUSIBLE_REQUESTS: f64 = 1e6;

/// Why a value was read as unknown.
fn implausible(v: f64, max: f64) -> Option<&'static str> {
    if !v.is_finite() {
        Some("non_finite")
    } else if v < 0.0 {
        Some("negative")
    } else if v > max {
        Some("out_of_range")
    } else {
        None
    }
}

impl EngineStats {
    /// The stats with implausible values (non-finite, negative, a queue or
    /// batch over [`MAX_PLAUSIBLE_REQUESTS`], KV-cache use outside 0..1)
    /// read as unknown, and the reasons of each value dropped. A buggy or
    /// hostile engine cannot push the autoscaler with them.
    pub fn sanitized(self) -> (Self, Vec<&'static str>) {
        let mut rejected = Vec::new();
        let mut keep = |v: Option<f64>, max: f64| {
            let v = v?;
            match implausible(v, max) {
                Some(why) => {
                    rejected.push(why);
                    None
                }
                None => Some(v),
            }
        };
        let out = Self {
            queue: keep(self.queue, MAX_PLAUSIBLE_REQUESTS),
            running: keep(self.running, MAX_PLAUSIBLE_REQUESTS),
            kv_cache: keep(self.kv_cache, 1.0),
        };
        (out, rejected)
    }
}

fn first(samples: &[Sample], names: &[&str], f: fn(&[Sample], &str) -> Option<f64>) -> Option<f64> {
    names.iter().find_map(|n| f(samples, n))
}

impl EngineKind {
    /// Reads queue, running and KV-cache use from the engine's metrics
    /// (vLLM's old and new names, SGLang, TGI, llama.cpp), raw: see
    /// [`EngineStats::sanitized`].
    pub fn raw_stats(self, samples: &[Sample]) -> EngineStats {
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
            kv_cache: first(samples, kv, promtext::mean),
        }
    }

    /// [`Self::raw_stats`], sanitized.
    pub fn stats(self, samples: &[Sample]) -> EngineStats {
        self.raw_stats(samples).sanitized().0
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

/// vLLM's LoRA metric: which adapters have requests running and waiting.
pub const LORA_INFO_METRIC: &str = "vllm:lora_requests_info";

/// The longest label value of [`LORA_INFO_METRIC`] passed on (a list of
/// adapter names); a longer one is dropped as implausible.
pub const MAX_LORA_LABEL: usize = 4096;

/// The most recent series of the engine's [`LORA_INFO_METRIC`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoraInfo {
    /// `max_lora`: adapters the engine holds on the GPU at once.
    pub max_lora: String,
    /// `running_lora_adapters`: comma-separated.
    pub running: String,
    /// `waiting_lora_adapters`: comma-separated.
    pub waiting: String,
    /// The value: when the engine last saw these lists (Unix time).
    pub at: f64,
}

impl LoraInfo {
    /// The label values, in the order of the sidecar's gauge.
    pub fn labels(&self) -> [&str; 3] {
        [&self.max_lora, &self.running, &self.waiting]
    }
}

/// The series of [`LORA_INFO_METRIC`] with the largest value, as vLLM
/// publishes it (one series per combination of lists seen, each valued
/// with the time it was last current; the endpoint picker reads the most
/// recent the same way). Series with a non-finite value, a `max_lora` that
/// is not a number or a label over [`MAX_LORA_LABEL`] are skipped. Pure.
pub fn lora_info(samples: &[Sample]) -> Option<LoraInfo> {
    samples
        .iter()
        .filter(|s| s.name == LORA_INFO_METRIC && s.value.is_finite())
        .filter_map(|s| {
            let label = |k: &str| {
                let v = s.labels.get(k).map(String::as_str).unwrap_or_default();
                (v.len() <= MAX_LORA_LABEL).then(|| v.to_string())
            };
            let max_lora = label("max_lora")?;
            if !digits(&max_lora, 9) {
                return None;
            }
            Some(LoraInfo {
                max_lora,
                running: label("running_lora_adapters")?,
                waiting: label("waiting_lora_adapters")?,
                at: s.value,
            })
        })
        .max_by(|a, b| a.at.total_cmp(&b.at))
}

/// vLLM's KV-cache configuration, as an info metric (value 1, the
/// configuration in its labels).
pub const CACHE_INFO_METRIC: &str = "vllm:cache_config_info";

/// What the sidecar passes on of the engine's [`CACHE_INFO_METRIC`]: what
/// a gateway's endpoint picker reads to size its prefix-cache index.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheInfo {
    /// `block_size`: tokens per KV-cache block.
    pub block_size: String,
    /// `num_gpu_blocks`: KV-cache blocks on the GPU (empty when unknown).
    pub num_gpu_blocks: String,
}

impl CacheInfo {
    /// The label values, in the order of the sidecar's gauge.
    pub fn labels(&self) -> [&str; 2] {
        [&self.block_size, &self.num_gpu_blocks]
    }
}

/// Whether `v` is a non-negative integer of at most `max` digits.
fn digits(v: &str, max: usize) -> bool {
    !v.is_empty() && v.len() <= max && v.bytes().all(|b| b.is_ascii_digit())
}

/// The engine's block size and GPU blocks from [`CACHE_INFO_METRIC`]: its
/// first series whose `block_size` is a number (and `num_gpu_blocks` a
/// number or absent). Pure.
pub fn cache_info(samples: &[Sample]) -> Option<CacheInfo> {
    samples
        .iter()
        .filter(|s| s.name == CACHE_INFO_METRIC)
        .find_map(|s| {
            let block_size = s.labels.get("block_size").filter(|v| digits(v, 9))?;
            let num_gpu_blocks = match s.labels.get("num_gpu_blocks") {
                Some(v) if digits(v, 12) => v.clone(),
                Some(v) if v.is_empty() || v == "None" => String::new(),
                Some(_) => return None,
                None => String::new(),
            };
            Some(CacheInfo {
                block_size: block_size.clone(),
                num_gpu_blocks,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_size_and_gpu_blocks_of_the_cache_config_are_read() {
        let text = "vllm:cache_config_info{block_size=\"16\",cache_dtype=\"auto\",enable_prefix_caching=\"True\",num_gpu_blocks=\"27000\"} 1.0\n";
        let info = cache_info(&promtext::parse(text)).expect("cache info");
        assert_eq!(info.labels(), ["16", "27000"]);
        // Before the engine has profiled its memory vLLM says None.
        let early = "vllm:cache_config_info{block_size=\"32\",num_gpu_blocks=\"None\"} 1.0\n";
        assert_eq!(
            cache_info(&promtext::parse(early)).expect("info").labels(),
            ["32", ""]
        );
        for bad in [
            "vllm:cache_config_info{block_size=\"x\",num_gpu_blocks=\"1\"} 1\n",
            "vllm:cache_config_info{num_gpu_blocks=\"1\"} 1\n",
            "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"-1\"} 1\n",
        ] {
            assert_eq!(cache_info(&promtext::parse(bad)), None, "{bad}");
        }
    }

    #[test]
    fn the_most_recent_lora_info_series_is_read() {
        let text = "# TYPE vllm:lora_requests_info gauge\n\
            vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"} 1.7e9\n\
            vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"sql,chat\",waiting_lora_adapters=\"x\"} 1.700000005e9\n\
            vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"old\",waiting_lora_adapters=\"\"} 1.6e9\n";
        let info = lora_info(&promtext::parse(text)).expect("a series");
        assert_eq!(info.labels(), ["4", "sql,chat", "x"]);
        assert_eq!(info.at, 1.700000005e9);
        // None published (vLLM without --enable-lora, other engines).
        assert_eq!(
            lora_info(&promtext::parse("vllm:num_requests_running 1\n")),
            None
        );
    }

    #[test]
    fn implausible_lora_info_series_are_skipped() {
        let long = "a".repeat(MAX_LORA_LABEL + 1);
        let text = format!(
            "vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"{long}\",waiting_lora_adapters=\"\"}} 3e9\n\
             vllm:lora_requests_info{{max_lora=\"four\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}} 3e9\n\
             vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}} +Inf\n\
             vllm:lora_requests_info{{max_lora=\"2\",running_lora_adapters=\"ok\",waiting_lora_adapters=\"\"}} 1e9\n"
        );
        let info = lora_info(&promtext::parse(&text)).expect("the plausible one");
        assert_eq!(info.labels(), ["2", "ok", ""]);
    }

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

    #[test]
    fn implausible_values_read_as_unknown() {
        let page = promtext::parse(
            "vllm:num_requests_waiting{model_name=\"m\"} 1e309\nvllm:num_requests_running 2e6\nvllm:kv_cache_usage_perc 1.5\n",
        );
        let (s, why) = EngineKind::Vllm.raw_stats(&page).sanitized();
        assert_eq!(s, EngineStats::default());
        assert_eq!(why, ["non_finite", "out_of_range", "out_of_range"]);
        for (text, reason) in [
            ("vllm:num_requests_waiting NaN\n", "non_finite"),
            ("vllm:num_requests_waiting -3\n", "negative"),
            ("vllm:num_requests_waiting +Inf\n", "non_finite"),
            ("vllm:kv_cache_usage_perc -0.1\n", "negative"),
        ] {
            let (s, why) = EngineKind::Vllm
                .raw_stats(&promtext::parse(text))
                .sanitized();
            assert_eq!(s, EngineStats::default(), "{text}");
            assert_eq!(why, [reason], "{text}");
        }
        let ok = promtext::parse("vllm:num_requests_waiting 7\nvllm:kv_cache_usage_perc 1\n");
        let (s, why) = EngineKind::Vllm.raw_stats(&ok).sanitized();
        assert_eq!((s.queue, s.kv_cache), (Some(7.0), Some(1.0)));
        assert!(why.is_empty());
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    const KINDS: [EngineKind; 5] = [
        EngineKind::Vllm,
        EngineKind::Sglang,
        EngineKind::Tgi,
        EngineKind::Llamacpp,
        EngineKind::Custom,
    ];

    /// What [`EngineStats::sanitized`] promises, for any raw stats.
    fn check(raw: EngineStats) -> Result<(), TestCaseError> {
        let (s, why) = raw.sanitized();
        for (v, max) in [
            (s.queue, MAX_PLAUSIBLE_REQUESTS),
            (s.running, MAX_PLAUSIBLE_REQUESTS),
            (s.kv_cache, 1.0),
        ] {
            if let Some(v) = v {
                prop_assert!(v.is_finite() && (0.0..=max).contains(&v), "{} kept", v);
            }
        }
        let known = |e: &EngineStats| [e.queue, e.running, e.kv_cache].iter().flatten().count();
        prop_assert_eq!(known(&raw), known(&s) + why.len(), "a reason per drop");
        // What is plausible is kept as is.
        for (r, k) in [
            (raw.queue, s.queue),
            (raw.running, s.running),
            (raw.kv_cache, s.kv_cache),
        ] {
            if let Some(k) = k {
                prop_assert_eq!(r.map(f64::to_bits), Some(k.to_bits()));
            }
        }
        prop_assert_eq!(s.sanitized(), (s, Vec::new()), "idempotent");
        Ok(())
    }

    /// Values an engine could expose, the hostile ones included.
    fn value_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<f64>().prop_map(|v| v.to_string()),
            (0.0f64..2.0).prop_map(|v| v.to_string()),
            prop::sample::select(vec![
                "NaN", "+Inf", "-Inf", "inf", "1e309", "-0", "1e6", "1000001", "-1e-300",
            ])
            .prop_map(str::to_string),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn sanitized_stats_are_plausible(
            queue in any::<Option<f64>>(),
            running in any::<Option<f64>>(),
            kv_cache in any::<Option<f64>>(),
        ) {
            check(EngineStats { queue, running, kv_cache })?;
        }

        #[test]
        fn stats_read_from_any_page_are_plausible(
            lines in vec(
                (
                    prop::sample::select(vec![
                        "vllm:num_requests_waiting",
                        "vllm:num_requests_running",
                        "vllm:kv_cache_usage_perc",
                        "vllm:gpu_cache_usage_perc",
                        "sglang:num_queue_reqs",
                        "sglang:num_running_reqs",
                        "sglang:token_usage",
                        "tgi_queue_size",
                        "tgi_batch_current_size",
                        "llamacpp:requests_deferred",
                        "llamacpp:requests_processing",
                        "llamacpp:kv_cache_usage_ratio",
                    ]),
                    prop::option::of("[a-z]{1,3}=\"[a-z0-9]{0,3}\""),
                    value_text(),
                ),
                0..16,
            ),
        ) {
            let text: Vec<String> = lines
                .iter()
                .map(|(name, labels, value)| match labels {
                    Some(l) => format!("{name}{{{l}}} {value}"),
                    None => format!("{name} {value}"),
                })
                .collect();
            let samples = promtext::parse(&text.join("\n"));
            for kind in KINDS {
                let raw = kind.raw_stats(&samples);
                check(raw)?;
                prop_assert_eq!(kind.stats(&samples), raw.sanitized().0);
            }
        }
    }
}
