//! strata-sidecar: the front door of every model pod. An OpenAI-compatible
//! proxy that measures every request (TTFT, inter-token and end-to-end
//! latency, tokens), reads the engine's own metrics, samples NVML for the
//! pod's GPUs, loads LoRA adapters when the operator asks, and serves it all
//! on `/metrics`.
//!
//! Only the OpenAI inference API passes the proxy (strata_net::openai);
//! everything it reads is bounded ([`app::Limits`]).
//!
//! Pure parts: [`sse`], [`measure`], [`request`], [`promtext`], [`engine`],
//! [`framing`] (the engine's HTTP/1.1 answers), and the
//! device selection and energy accounting in [`nvml`].

pub mod admin;
pub mod app;
pub mod engine;
pub mod fetch;
pub mod framing;
pub mod measure;
pub mod metrics;
pub mod nvml;
pub mod promtext;
pub mod proxy;
pub mod request;
pub mod server;
pub mod sse;
pub mod upstream;
