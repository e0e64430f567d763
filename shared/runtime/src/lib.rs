//! The Millrace service shell: every binary's `main.rs` parses its config, hands the shell a
//! setup function returning its children, and the shell runs them under a supervision tree
//! with telemetry, an admin server and graceful draining.
//!
//! ```text
//! RootSupervisor (one_for_one, exponential backoff, R restarts in T s → exit non-zero)
//!  ├── admin        /healthz /readyz /metrics
//!  └── <service children>   consumers, API servers, writers …
//! ```

mod admin;
mod metrics;
pub mod servers;
mod shell;
pub mod supervisor;
mod telemetry;

pub use servers::{cancel_listener_child, consumer_child, serve_grpc, serve_http};
pub use shell::{Service, Setup, ShellArgs};
pub use supervisor::{ChildContext, ChildSpec, Readiness, SupervisorConfig};
