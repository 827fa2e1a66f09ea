//! Which processes the agent watches and what they are, from /proc: selection by pid, port,
//! executable, cgroup or pod; each process's framework and Kubernetes pod; the sockets it had
//! before the agent started; and the TLS code it runs (libssl, node's static OpenSSL, Go's
//! crypto/tls), which gets the TLS uprobes.

pub mod elf;
pub mod go;
pub mod kubernetes;
pub mod probe_site;
pub mod process;
pub mod routes;
pub mod select;
pub mod sockets;
pub mod tls;
