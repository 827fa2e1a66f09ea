//! TCP connections a process already had when the agent started, from /proc: the fd table
//! names socket inodes, the process's /proc/<pid>/net/tcp{,6} give their addresses and state.

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use crate::pipeline::events::Role;

const TCP_ESTABLISHED: &str = "01";
const TCP_LISTEN: &str = "0A";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExistingConnection {
    pub fd: i32,
    pub role: Role,
    pub remote: SocketAddr,
}

#[derive(Debug, PartialEq, Eq)]
struct TcpEntry {
    local: SocketAddr,
    remote: SocketAddr,
    state: String,
    inode: u64,
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6): each 32-bit word printed as the host-order
/// integer of network-order bytes.
fn parse_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for index in (0..ip.len()).step_by(8) {
        let word = u32::from_str_radix(ip.get(index..index + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn parse_tcp_table(table: &str) -> Vec<TcpEntry> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some(TcpEntry {
                local: parse_address(fields.get(1)?)?,
                remote: parse_address(fields.get(2)?)?,
                state: fields.get(3)?.to_string(),
                inode: fields.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

fn classify(entries: &[TcpEntry], sockets: &HashMap<u64, i32>) -> Vec<ExistingConnection> {
    let listening: HashSet<u16> = entries
        .iter()
        .filter(|entry| entry.state == TCP_LISTEN)
        .map(|entry| entry.local.port())
        .collect();
    let mut connections: Vec<ExistingConnection> = entries
        .iter()
        .filter(|entry| entry.state == TCP_ESTABLISHED)
        .filter_map(|entry| {
            let fd = *sockets.get(&entry.inode)?;
            let role = if listening.contains(&entry.local.port()) {
                Role::Server
            } else {
                Role::Client
            };
            Some(ExistingConnection {
                fd,
                role,
                remote: entry.remote,
            })
        })
        .collect();
    connections.sort_by_key(|connection| connection.fd);
    connections
}

/// The process's socket fds by inode.
fn socket_fds(pid: u32) -> HashMap<u64, i32> {
    let mut sockets = HashMap::new();
    if let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in entries.flatten() {
            let Ok(target) = fs::read_link(entry.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let (Some(inode), Some(fd)) = (
                target
                    .strip_prefix("socket:[")
                    .and_then(|rest| rest.strip_suffix(']'))
                    .and_then(|inode| inode.parse::<u64>().ok()),
                entry
                    .file_name()
                    .to_str()
                    .and_then(|fd| fd.parse::<i32>().ok()),
            ) {
                sockets.insert(inode, fd);
            }
        }
    }
    sockets
}

/// The TCP sockets of the process's network namespace.
fn tcp_entries(pid: u32) -> Vec<TcpEntry> {
    let mut entries = Vec::new();
    for table in ["tcp", "tcp6"] {
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
            entries.extend(parse_tcp_table(&text));
        }
    }
    entries
}

/// Established TCP connections held by `pid`, with the role its side plays.
pub fn existing_connections(pid: u32) -> Vec<ExistingConnection> {
    classify(&tcp_entries(pid), &socket_fds(pid))
}

/// Whether `pid` holds a socket listening on one of `ports`.
pub fn listens_on(pid: u32, ports: &[u16]) -> bool {
    let sockets = socket_fds(pid);
    if sockets.is_empty() {
        return false;
    }
    tcp_entries(pid).iter().any(|entry| {
        entry.state == TCP_LISTEN
            && ports.contains(&entry.local.port())
            && sockets.contains_key(&entry.inode)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:13BF 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1000 1 0000000000000000 100 0 0 10 0
   1: 0100007F:13BF 0100007F:D3A2 01 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:D3A4 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 1002 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:D3A6 0100007F:1F91 01 00000000:00000000 00:00000000 00000000     0        0 9999 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn classifies_accepted_and_connected_sockets_of_the_process() {
        let entries = parse_tcp_table(TABLE);
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[0].local, "127.0.0.1:5055".parse().unwrap());
        let sockets = HashMap::from([(1000, 3), (1001, 7), (1002, 9)]);
        assert_eq!(
            classify(&entries, &sockets),
            vec![
                ExistingConnection {
                    fd: 7,
                    role: Role::Server,
                    remote: "127.0.0.1:54178".parse().unwrap()
                },
                ExistingConnection {
                    fd: 9,
                    role: Role::Client,
                    remote: "127.0.0.1:8080".parse().unwrap()
                },
            ]
        );
    }

    #[test]
    fn parses_ipv6_addresses() {
        assert_eq!(
            parse_address("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
    }
}
