//! strata-net: the request path's building blocks, shared by the sidecar
//! (the pod's front door) and the operator's activator (the front door of
//! Models at zero), so that both enforce the same allowlist and the same
//! bounds:
//!
//! - [`openai`]: the default-deny allowlist of the OpenAI inference API and
//!   the table of engine admin paths it keeps out;
//! - [`server`]: a bounded HTTP/1.1 server (connections, head size and time,
//!   idle keep-alive, optional TLS);
//! - [`body`]: body reads bounded in size, time and shared memory;
//! - [`headers`]: hop-by-hop header stripping;
//! - [`load`]: the load a replica reports to the gateway on its answers;
//! - [`runtime`]: the tokio runtime of every Strata binary, its worker
//!   threads bounded (`--worker-threads`).

pub mod body;
pub mod headers;
pub mod load;
pub mod openai;
pub mod runtime;
pub mod server;
