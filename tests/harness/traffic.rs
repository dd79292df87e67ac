//! Traffic generators that run inside a namespace: plain sockets, no external tools.
use std::{
    io,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use crate::netns::Netns;

/// Options for a UDP burst.
#[derive(Clone, Copy)]
pub struct Udp {
    pub dst: SocketAddr,
    pub src: Option<IpAddr>,
    pub count: usize,
    pub payload: usize,
    pub ttl: Option<u32>,
    /// Bytes to send instead of a filler payload of `payload` bytes.
    pub data: Option<&'static [u8]>,
    /// Set Don't Fragment (IPv4) / no local fragmentation (IPv6): the path MTU is not probed.
    pub dont_fragment: bool,
}

impl Udp {
    pub fn to(dst: &str, port: u16) -> Self {
        let ip: IpAddr = dst.parse().expect("address");
        Udp { dst: SocketAddr::new(ip, port), src: None, count: 1, payload: 32, ttl: None, data: None, dont_fragment: false }
    }
    pub fn count(self, count: usize) -> Self {
        Udp { count, ..self }
    }
    pub fn from(self, src: &str) -> Self {
        Udp { src: Some(src.parse().unwrap()), ..self }
    }
    pub fn payload(self, payload: usize) -> Self {
        Udp { payload, ..self }
    }
    pub fn ttl(self, ttl: u32) -> Self {
        Udp { ttl: Some(ttl), ..self }
    }
    pub fn data(self, data: &'static [u8]) -> Self {
        Udp { data: Some(data), ..self }
    }
    pub fn dont_fragment(self) -> Self {
        Udp { dont_fragment: true, ..self }
    }

    /// Sends the burst from inside `ns`; returns the source port used.
    pub fn send(self, ns: &Netns) -> u16 {
        ns.run(move || {
            let bind: SocketAddr = match (self.src, self.dst) {
                (Some(ip), _) => SocketAddr::new(ip, 0),
                (None, SocketAddr::V4(_)) => "0.0.0.0:0".parse().unwrap(),
                (None, SocketAddr::V6(_)) => "[::]:0".parse().unwrap(),
            };
            let sock = UdpSocket::bind(bind).expect("bind");
            if let Some(ttl) = self.ttl {
                if self.dst.is_ipv4() {
                    sock.set_ttl(ttl).unwrap();
                } else {
                    setsockopt(&sock, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, ttl as i32);
                }
            }
            if self.dont_fragment {
                if self.dst.is_ipv4() {
                    setsockopt(&sock, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_PROBE);
                } else {
                    setsockopt(&sock, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_PROBE);
                    setsockopt(&sock, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1);
                }
            }
            let buf = self.data.map_or_else(|| vec![0x5a; self.payload], <[u8]>::to_vec);
            for _ in 0..self.count {
                // Errors (ICMP feedback such as ECONNREFUSED) are expected in drop scenarios.
                let _ = sock.send_to(&buf, self.dst);
            }
            sock.local_addr().unwrap().port()
        })
    }
}

fn setsockopt<S: AsRawFd>(s: &S, level: i32, name: i32, value: i32) {
    // SAFETY: valid fd and a pointer to an int of the given size.
    let rc = unsafe {
        libc::setsockopt(s.as_raw_fd(), level, name, (&value as *const i32).cast(), std::mem::size_of::<i32>() as u32)
    };
    assert_eq!(rc, 0, "setsockopt({level}, {name}): {}", io::Error::last_os_error());
}

/// One TCP connection attempt from inside `ns`.
pub fn tcp_connect(ns: &Netns, dst: &str, port: u16) -> io::Result<()> {
    let addr = SocketAddr::new(dst.parse().expect("address"), port);
    ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(|_| ()))
}

/// A UDP socket bound inside `ns`, for traffic that must be delivered.
pub fn udp_listener(ns: &Netns, addr: &str) -> UdpSocket {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(move || UdpSocket::bind(addr).expect("bind listener"))
}
