//! apitoolkit-agent: watches selected processes' HTTP traffic from the kernel and turns every
//! request/response exchange into an APIToolkit payload.
//!
//! Data flows one way, each stage in its own folder:
//! - [`capture`]: loads and attaches the eBPF programs; the ring buffer, maps and loss counters.
//! - [`targets`]: which processes are watched, what they are (framework, pod), their existing
//!   sockets and TLS libraries, all read from /proc.
//! - [`pipeline`]: pure, no I/O: kernel records -> events -> connections -> protocol reassembly
//!   -> exchanges -> payloads -> redaction.
//! - [`sinks`]: where payloads go (stdout, Pub/Sub), through byte-bounded queues.
//! - [`agent`]: the runtime that wires them together; [`observability`] reports its counters.

pub mod agent;
pub mod allocator;
pub mod capture;
pub mod config;
pub mod observability;
pub mod pipeline;
pub mod sinks;
pub mod targets;
