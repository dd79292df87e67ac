//! Hand-built IP packets sent as they are (raw sockets with the IP header included): IPv4 and
//! IPv6 fragments with chosen offsets, so the tests can make the kernel time out, refuse
//! duplicates and overlaps, the way a broken network or sender would.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::netns::Netns;

/// One IP fragment: `payload` starts at byte `offset` of the original packet's payload.
#[derive(Debug, Clone)]
pub struct Fragment {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub id: u32,
    /// Byte offset (a multiple of 8).
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
    /// Upper-layer protocol of the original packet (17 = UDP).
    pub proto: u8,
    pub payload: Vec<u8>,
}

impl Fragment {
    /// The fragments of one UDP datagram (`sport` -> `dport`, `len` payload bytes), cut
    /// every `size` bytes (a multiple of 8).
    pub fn udp(
        src: &str,
        dst: &str,
        id: u32,
        ports: (u16, u16),
        len: usize,
        size: usize,
    ) -> Vec<Fragment> {
        let mut whole = Vec::with_capacity(8 + len);
        whole.extend_from_slice(&ports.0.to_be_bytes());
        whole.extend_from_slice(&ports.1.to_be_bytes());
        whole.extend_from_slice(&((8 + len) as u16).to_be_bytes());
        whole.extend_from_slice(&[0, 0]); // no UDP checksum (allowed for IPv4 only; IPv6
                                          // fragments here are never reassembled into a
                                          // delivered datagram)
        whole.extend(std::iter::repeat_n(b'x', len));
        let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        whole
            .chunks(size)
            .enumerate()
            .map(|(i, chunk)| Fragment {
                src,
                dst,
                id,
                offset: (i * size) as u16,
                more: (i + 1) * size < whole.len(),
                proto: 17,
                payload: chunk.to_vec(),
            })
            .collect()
    }

    /// The packet as it goes on the wire (from the IP header on).
    pub fn bytes(&self) -> Vec<u8> {
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => self.v4(s, d),
            (IpAddr::V6(s), IpAddr::V6(d)) => self.v6(s, d),
            _ => panic!("mixed address families"),
        }
    }

    fn v4(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let total = 20 + self.payload.len();
        let flags_off = (u16::from(self.more) << 13) | (self.offset / 8);
        let mut h = vec![0x45, 0];
        h.extend_from_slice(&(total as u16).to_be_bytes());
        h.extend_from_slice(&(self.id as u16).to_be_bytes());
        h.extend_from_slice(&flags_off.to_be_bytes());
        h.extend_from_slice(&[64, self.proto, 0, 0]);
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        let sum = checksum(&h);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        h.extend_from_slice(&self.payload);
        h
    }

    fn v6(&self, src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[44, 64]); // next header: fragment; hop limit
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        let off = (self.offset & 0xfff8) | u16::from(self.more);
        p.extend_from_slice(&[self.proto, 0]);
        p.extend_from_slice(&off.to_be_bytes());
        p.extend_from_slice(&self.id.to_be_bytes());
        p.extend_from_slice(&self.payload);
        p
    }
}

/// The Internet checksum of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `packets` from inside `ns` exactly as built (the kernel adds nothing but routing).
pub fn send(ns: &Netns, packets: &[Fragment]) {
    let packets = packets.to_vec();
    ns.run(move || {
        for p in &packets {
            send_raw(p).unwrap_or_else(|e| panic!("sending {p:?}: {e}"));
        }
    });
}

fn send_raw(p: &Fragment) -> io::Result<()> {
    let family = if p.dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); IPPROTO_RAW implies the header is included.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new, owned socket.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let bytes = p.bytes();
    let addr = socket2_addr(SocketAddr::new(p.dst, 0));
    // SAFETY: valid buffer and sockaddr of the given length.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            addr.0.as_ptr().cast(),
            addr.1,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A socket address as bytes for sendto(2), with its length.
fn socket2_addr(a: SocketAddr) -> (Vec<u8>, libc::socklen_t) {
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            (
                as_bytes(&sin),
                std::mem::size_of::<libc::sockaddr_in>() as _,
            )
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            (
                as_bytes(&sin6),
                std::mem::size_of::<libc::sockaddr_in6>() as _,
            )
        }
    }
}

fn as_bytes<T>(v: &T) -> Vec<u8> {
    // SAFETY: plain-old-data sockaddr structs, read as bytes.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_cover_the_datagram_with_valid_headers() {
        let f = Fragment::udp("10.0.0.1", "10.0.0.2", 7, (1000, 2000), 2000, 1000);
        assert_eq!(f.len(), 3);
        assert_eq!((f[0].offset, f[0].more), (0, true));
        assert_eq!((f[2].offset, f[2].more), (2000, false));
        let b = f[1].bytes();
        assert_eq!(u16::from_be_bytes([b[6], b[7]]), 0x2000 | 125);
        assert_eq!(checksum(&b[..20]), 0, "the header checksums to zero");
        let f6 = Fragment::udp("fd00::1", "fd00::2", 9, (1, 2), 100, 64);
        let b6 = f6[1].bytes();
        assert_eq!((b6[6], b6[40]), (44, 17));
        assert_eq!(u16::from_be_bytes([b6[42], b6[43]]), 64);
    }
}
