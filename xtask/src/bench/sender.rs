//! The drop storm: UDP datagrams from inside a namespace, many flows, sent in batches with
//! sendmmsg(2) so the sender is not the bottleneck.
use std::{
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use dropscope_tests::Netns;

/// Flows (destination ports) the storm cycles through.
pub const FLOWS: u16 = 64;
const BATCH: usize = 64;

/// Sends to `dst`:`base_port`..`base_port + FLOWS` for `duration`; returns datagrams sent.
pub fn storm(ns: &Netns, dst: Ipv4Addr, base_port: u16, duration: Duration) -> u64 {
    ns.run(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind sender");
        let payload = [0x5au8; 64];
        let mut addrs: Vec<libc::sockaddr_in> = (0..BATCH)
            .map(|i| sockaddr(dst, base_port + (i as u16 % FLOWS)))
            .collect();
        let mut iov = libc::iovec {
            iov_base: payload.as_ptr() as *mut _,
            iov_len: payload.len(),
        };
        let mut msgs = mmsg_headers(&mut addrs, &mut iov);
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < duration {
            // SAFETY: msgs points at BATCH valid headers whose buffers outlive the call.
            let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
            if n > 0 {
                sent += n as u64;
            }
        }
        sent
    })
}

/// `dst`:`port` for the socket calls.
pub fn sockaddr(dst: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// One `sendmmsg` header per destination, all sending `iov`. The headers point at `addrs` and
/// `iov`: both must stay where they are while the headers are used (the addresses may be
/// rewritten in place between calls).
pub fn mmsg_headers(addrs: &mut [libc::sockaddr_in], iov: &mut libc::iovec) -> Vec<libc::mmsghdr> {
    addrs
        .iter_mut()
        .map(|a| {
            // SAFETY: a zeroed msghdr is valid; the fields set point at live buffers.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (a as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect()
}
