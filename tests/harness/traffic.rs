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
        Udp {
            dst: SocketAddr::new(ip, port),
            src: None,
            count: 1,
            payload: 32,
            ttl: None,
            data: None,
            dont_fragment: false,
        }
    }
    pub fn count(self, count: usize) -> Self {
        Udp { count, ..self }
    }
    pub fn from(self, src: &str) -> Self {
        Udp {
            src: Some(src.parse().unwrap()),
            ..self
        }
    }
    pub fn payload(self, payload: usize) -> Self {
        Udp { payload, ..self }
    }
    pub fn ttl(self, ttl: u32) -> Self {
        Udp {
            ttl: Some(ttl),
            ..self
        }
    }
    pub fn data(self, data: &'static [u8]) -> Self {
        Udp {
            data: Some(data),
            ..self
        }
    }
    pub fn dont_fragment(self) -> Self {
        Udp {
            dont_fragment: true,
            ..self
        }
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
                    setsockopt(
                        &sock,
                        libc::IPPROTO_IPV6,
                        libc::IPV6_UNICAST_HOPS,
                        ttl as i32,
                    );
                }
            }
            if self.dont_fragment {
                if self.dst.is_ipv4() {
                    setsockopt(
                        &sock,
                        libc::IPPROTO_IP,
                        libc::IP_MTU_DISCOVER,
                        libc::IP_PMTUDISC_PROBE,
                    );
                } else {
                    setsockopt(
                        &sock,
                        libc::IPPROTO_IPV6,
                        libc::IPV6_MTU_DISCOVER,
                        libc::IPV6_PMTUDISC_PROBE,
                    );
                    setsockopt(&sock, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1);
                }
            }
            let buf = self
                .data
                .map_or_else(|| vec![0x5a; self.payload], <[u8]>::to_vec);
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
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt({level}, {name}): {}",
        io::Error::last_os_error()
    );
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

/// Internet checksum (RFC 1071) over `data`, starting from `sum`.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends a bare TCP ACK (no connection behind it) from inside `ns` through a raw socket:
/// conntrack without loose pickup marks it INVALID.
pub fn tcp_bare_ack(ns: &Netns, src: &str, dst: &str, sport: u16, dport: u16) {
    let (src, dst): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
        (src.parse().unwrap(), dst.parse().unwrap());
    ns.run(move || {
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
        tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x10; // ACK
        tcp[14..16].copy_from_slice(&1000u16.to_be_bytes());
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&tcp);
        let sum = checksum(&pseudo, 0);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        // SAFETY: plain socket calls with valid buffers.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP);
            assert!(fd >= 0, "raw socket: {}", io::Error::last_os_error());
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(dst.octets()),
                },
                sin_zero: [0; 8],
            };
            let n = libc::sendto(
                fd,
                tcp.as_ptr().cast(),
                tcp.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            assert_eq!(n, 20, "sendto: {}", io::Error::last_os_error());
            libc::close(fd);
        }
    })
}

/// Sends `count` IPv4/UDP frames with a corrupted IP header checksum out of `ifname` in `ns`
/// (an AF_PACKET socket, below the IP stack), addressed to the peer's MAC `dst_mac`.
pub fn corrupt_ipv4_frames(
    ns: &Netns,
    ifname: &str,
    dst_mac: [u8; 6],
    src: &str,
    dst: &str,
    count: usize,
) {
    let (src, dst): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
        (src.parse().unwrap(), dst.parse().unwrap());
    let ifname = std::ffi::CString::new(ifname).unwrap();
    ns.run(move || {
        let mut frame = Vec::new();
        frame.extend_from_slice(&dst_mac);
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        frame.extend_from_slice(&[0x08, 0x00]);
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(20u16 + 8 + 4).to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&src.octets());
        ip[16..20].copy_from_slice(&dst.octets());
        let good = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&(good ^ 0x5555).to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&[0x9c, 0x40, 0x25, 0x80, 0, 12, 0, 0, b'b', b'a', b'd', b'!']);
        // SAFETY: plain socket calls with valid buffers.
        unsafe {
            let ifindex = libc::if_nametoindex(ifname.as_ptr());
            assert!(ifindex > 0, "no such interface");
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                (libc::ETH_P_ALL as u16).to_be() as i32,
            );
            assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&dst_mac);
            for _ in 0..count {
                let n = libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(
                    n as usize,
                    frame.len(),
                    "sendto: {}",
                    io::Error::last_os_error()
                );
            }
            libc::close(fd);
        }
    })
}
