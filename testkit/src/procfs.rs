//! What Linux tells about a running server process: its memory, its CPU time, the options
//! of its own side of an accepted socket (fetched with `pidfd_getfd`, so a test checks the real
//! server's socket, not a copy of the client's view), and the ports of its outgoing connections.

use std::{net::SocketAddr, os::fd::AsFd};

/// A field of `/proc/PID/status` in bytes (`VmRSS`, `VmHWM`, …).
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resident memory now.
pub fn rss_bytes(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:").expect("reading /proc/PID/status")
}

/// The highest resident memory the process ever had.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM:").expect("reading /proc/PID/status")
}

/// User plus system CPU time the process used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc/PID/stat");
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis are
    // plain: state is field 3, utime 14, stime 15.
    let after = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = rustix::param::clock_ticks_per_second() as f64;
    ticks as f64 / per_second
}

/// Parses an address of `/proc/net/tcp{,6}` ("0100007F:1F90"): only the port matters here.
fn port_of(hex: &str) -> Option<u16> {
    u16::from_str_radix(hex.rsplit(':').next()?, 16).ok()
}

/// The inode of the server-side socket whose peer is `client` (a local address of the test).
fn socket_inode(pid: u32, server_port: u16, client: SocketAddr) -> Option<u64> {
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok()?;
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9
                && port_of(f[1]) == Some(server_port)
                && port_of(f[2]) == Some(client.port())
            {
                return f[9].parse().ok();
            }
        }
    }
    None
}

/// Whether the server process `pid` set `TCP_NODELAY` on its side of the connection from
/// `client` (the test's local address) to its port `server_port`. `None` while the server has
/// not accepted that connection yet.
pub fn server_side_nodelay(pid: u32, server_port: u16, client: SocketAddr) -> Option<bool> {
    let inode = socket_inode(pid, server_port, client)?;
    let wanted = format!("socket:[{inode}]");
    let fd = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(Result::ok)
        .find(|entry| {
            std::fs::read_link(entry.path()).is_ok_and(|link| link.to_string_lossy() == wanted)
        })?
        .file_name()
        .to_str()?
        .parse::<i32>()
        .ok()?;
    let process = rustix::process::Pid::from_raw(pid as i32)?;
    let pidfd = rustix::process::pidfd_open(process, rustix::process::PidfdFlags::empty())
        .expect("pidfd_open (Linux 5.3+)");
    let socket =
        rustix::process::pidfd_getfd(pidfd.as_fd(), fd, rustix::process::PidfdGetfdFlags::empty())
            .expect("pidfd_getfd (Linux 5.6+, and permission to trace the server)");
    Some(rustix::net::sockopt::tcp_nodelay(&socket).expect("getsockopt TCP_NODELAY"))
}

/// The inodes of the sockets process `pid` holds open.
fn socket_inodes(pid: u32) -> std::collections::HashSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(Result::ok)
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter_map(|link| {
                    let link = link.to_string_lossy().into_owned();
                    link.strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The local ports of the TCP connections process `pid` holds to port `remote_port` (say, its
/// database sessions, which `pg_stat_activity` shows by `client_port`). Empty once it is gone.
pub fn ports_connected_to(pid: u32, remote_port: u16) -> Vec<u16> {
    let inodes = socket_inodes(pid);
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        // The table lists the whole network namespace: the process's own sockets are those
        // whose inode it holds.
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9
                && port_of(f[2]) == Some(remote_port)
                && f[9].parse().is_ok_and(|inode: u64| inodes.contains(&inode))
            {
                ports.extend(port_of(f[1]));
            }
        }
    }
    ports
}
