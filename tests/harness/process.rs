//! What a running process holds, read from /proc: open files, threads, memory, and the
//! network namespaces its sockets and threads are in (a socket or a thread keeps a deleted
//! namespace alive).
use std::{fs, os::unix::fs::MetadataExt};

/// `ioctl(SIOCGSKNS)`: an fd for the network namespace of a socket (linux/sockios.h).
const SIOCGSKNS: libc::c_ulong = 0x894C;

/// Open file descriptors: (fd number, what it links to, e.g. "socket:[123]").
pub fn fds(pid: u32) -> Vec<(i32, String)> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = fs::read_link(e.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect()
}

/// The network namespace inode of socket `fd` of process `pid` (the socket is duplicated
/// with pidfd_getfd and asked with SIOCGSKNS; both are closed again at once).
pub fn socket_netns(pid: u32, fd: i32) -> Option<u64> {
    // SAFETY: plain syscalls on fds this function owns and closes.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) as i32;
        if pidfd < 0 {
            return None;
        }
        let sock = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        libc::close(pidfd);
        if sock < 0 {
            return None;
        }
        let ns = libc::ioctl(sock, SIOCGSKNS as _);
        libc::close(sock);
        if ns < 0 {
            return None;
        }
        let mut st: libc::stat = std::mem::zeroed();
        let ok = libc::fstat(ns, &mut st) == 0;
        libc::close(ns);
        ok.then_some(st.st_ino)
    }
}

/// The network namespace of every socket the process holds: (fd, netns inode).
pub fn sockets(pid: u32) -> Vec<(i32, u64)> {
    fds(pid)
        .into_iter()
        .filter(|(_, target)| target.starts_with("socket:"))
        .filter_map(|(fd, _)| Some((fd, socket_netns(pid, fd)?)))
        .collect()
}

/// Thread ids.
pub fn threads(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// The network namespace inode of each thread (a thread may have joined another one).
pub fn thread_netns(pid: u32) -> Vec<(u32, u64)> {
    threads(pid)
        .into_iter()
        .filter_map(|tid| {
            let meta = fs::metadata(format!("/proc/{pid}/task/{tid}/ns/net")).ok()?;
            Some((tid, meta.ino()))
        })
        .collect()
}

/// Resident memory in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Child processes (e.g. `nft` or `iptables-save` run for evidence) of any thread.
pub fn children(pid: u32) -> Vec<u32> {
    threads(pid)
        .into_iter()
        .flat_map(|tid| {
            fs::read_to_string(format!("/proc/{pid}/task/{tid}/children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The network namespace inode of a process (its main thread).
pub fn netns_of(pid: u32) -> u64 {
    fs::metadata(format!("/proc/{pid}/ns/net"))
        .map(|m| m.ino())
        .unwrap_or(0)
}
