//! The few pcapng blocks dropscope writes (section header, interface description, enhanced
//! packet, interface statistics), encoded by hand: the format is small, and the section
//! header must be rewritten in place at the end with the final counts, which needs control
//! over its exact size that general-purpose writers do not give.
//!
//! Little-endian throughout; every block and option is padded to 32 bits
//! (draft-ietf-opsawg-pcapng).

/// `LINKTYPE_ETHERNET`: every interface of a dropscope file uses it, because libpcap (and so
/// tcpdump) refuses a file whose interfaces have different link types.
pub const LINKTYPE_ETHERNET: u16 = 1;

const SHB: u32 = 0x0A0D_0D0A;
const IDB: u32 = 1;
const EPB: u32 = 6;
const ISB: u32 = 5;
const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;

const OPT_END: u16 = 0;
const OPT_COMMENT: u16 = 1;
const SHB_HARDWARE: u16 = 2;
const SHB_OS: u16 = 3;
const SHB_USERAPPL: u16 = 4;
const IF_NAME: u16 = 2;
const IF_DESCRIPTION: u16 = 3;
const IF_TSRESOL: u16 = 9;
const IF_OS: u16 = 12;
const EPB_FLAGS: u16 = 2;
const ISB_STARTTIME: u16 = 2;
const ISB_ENDTIME: u16 = 3;
const ISB_USRDELIV: u16 = 8;

/// Packet direction (`epb_flags` bits 0-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound = 1,
    Outbound = 2,
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Options of one block, ended by `opt_endofopt`.
#[derive(Default)]
struct Options(Vec<u8>);

impl Options {
    fn add(&mut self, code: u16, value: &[u8]) -> &mut Self {
        // An option holds at most 65535 bytes; comments are cut at a character boundary.
        let value = &value[..value.len().min(u16::MAX as usize - 3)];
        self.0.extend_from_slice(&code.to_le_bytes());
        self.0
            .extend_from_slice(&(value.len() as u16).to_le_bytes());
        self.0.extend_from_slice(value);
        self.0.extend(std::iter::repeat_n(0, pad4(value.len())));
        self
    }

    fn text(&mut self, code: u16, value: &str) -> &mut Self {
        self.add(code, truncate(value, u16::MAX as usize - 3).as_bytes())
    }

    fn end(mut self) -> Vec<u8> {
        if !self.0.is_empty() {
            self.0.extend_from_slice(&OPT_END.to_le_bytes());
            self.0.extend_from_slice(&0u16.to_le_bytes());
        }
        self.0
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn block(kind: u32, body: &[u8]) -> Vec<u8> {
    let len = (12 + body.len()) as u32;
    let mut b = Vec::with_capacity(len as usize);
    b.extend_from_slice(&kind.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(body);
    b.extend_from_slice(&len.to_le_bytes());
    b
}

/// A section header block. With `size`, the block is padded after its options to exactly
/// that many bytes (zeros, which a reader that goes on past `opt_endofopt` sees as more
/// end-of-options), so that it can later be rewritten in place with a longer comment;
/// `None` if the options do not fit.
pub fn section_header(
    comment: &str,
    os: &str,
    application: &str,
    size: Option<usize>,
) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    body.extend_from_slice(&BYTE_ORDER_MAGIC.to_le_bytes());
    body.extend_from_slice(&1u16.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    // Section length unknown (-1): the file is written as a stream.
    body.extend_from_slice(&(-1i64).to_le_bytes());
    let mut o = Options::default();
    o.text(OPT_COMMENT, comment);
    o.text(SHB_HARDWARE, std::env::consts::ARCH);
    o.text(SHB_OS, os);
    o.text(SHB_USERAPPL, application);
    body.extend(o.end());
    if let Some(size) = size {
        let room = size.checked_sub(12 + body.len())?;
        if room % 4 != 0 {
            return None;
        }
        body.extend(std::iter::repeat_n(0, room));
    }
    Some(block(SHB, &body))
}

/// An interface description block (timestamps in nanoseconds).
pub fn interface(linktype: u16, snaplen: u32, name: &str, description: &str, os: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&linktype.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&snaplen.to_le_bytes());
    let mut o = Options::default();
    o.text(IF_NAME, name);
    o.text(IF_DESCRIPTION, description);
    o.add(IF_TSRESOL, &[9]);
    o.text(IF_OS, os);
    body.extend(o.end());
    block(IDB, &body)
}

/// An enhanced packet block: `data` is what was captured of an `orig_len`-byte packet.
pub fn packet(
    interface: u32,
    ts_ns: u64,
    data: &[u8],
    orig_len: u32,
    comment: &str,
    direction: Option<Direction>,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(20 + data.len() + comment.len() + 16);
    body.extend_from_slice(&interface.to_le_bytes());
    body.extend_from_slice(&((ts_ns >> 32) as u32).to_le_bytes());
    body.extend_from_slice(&(ts_ns as u32).to_le_bytes());
    body.extend_from_slice(&(data.len() as u32).to_le_bytes());
    body.extend_from_slice(&orig_len.max(data.len() as u32).to_le_bytes());
    body.extend_from_slice(data);
    body.extend(std::iter::repeat_n(0, pad4(data.len())));
    let mut o = Options::default();
    if !comment.is_empty() {
        o.text(OPT_COMMENT, comment);
    }
    if let Some(d) = direction {
        o.add(EPB_FLAGS, &(d as u32).to_le_bytes());
    }
    body.extend(o.end());
    block(EPB, &body)
}

/// An interface statistics block: the time span, the packets written for the interface, and
/// a comment.
pub fn statistics(
    interface: u32,
    start_ns: u64,
    end_ns: u64,
    delivered: u64,
    comment: &str,
) -> Vec<u8> {
    let ts = |ns: u64| {
        let mut b = ((ns >> 32) as u32).to_le_bytes().to_vec();
        b.extend_from_slice(&(ns as u32).to_le_bytes());
        b
    };
    let mut body = Vec::new();
    body.extend_from_slice(&interface.to_le_bytes());
    body.extend(ts(end_ns));
    let mut o = Options::default();
    if !comment.is_empty() {
        o.text(OPT_COMMENT, comment);
    }
    o.add(ISB_STARTTIME, &ts(start_ns));
    o.add(ISB_ENDTIME, &ts(end_ns));
    o.add(ISB_USRDELIV, &delivered.to_le_bytes());
    body.extend(o.end());
    block(ISB, &body)
}

/// A minimal reader for the tests: (block type, body) of each block.
#[cfg(test)]
pub fn blocks(mut file: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    while file.len() >= 12 {
        let kind = u32::from_le_bytes(file[0..4].try_into().unwrap());
        let len = u32::from_le_bytes(file[4..8].try_into().unwrap()) as usize;
        assert!(
            len >= 12 && len.is_multiple_of(4) && len <= file.len(),
            "bad block length {len}"
        );
        let trailer = u32::from_le_bytes(file[len - 4..len].try_into().unwrap()) as usize;
        assert_eq!(trailer, len, "trailing length");
        out.push((kind, file[8..len - 4].to_vec()));
        file = &file[len..];
    }
    assert!(file.is_empty(), "trailing bytes");
    out
}

/// The options of a block body after its fixed part of `fixed` bytes: (code, value).
#[cfg(test)]
pub fn options(body: &[u8], fixed: usize) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = fixed;
    while at + 4 <= body.len() {
        let code = u16::from_le_bytes([body[at], body[at + 1]]);
        let len = u16::from_le_bytes([body[at + 2], body[at + 3]]) as usize;
        if code == OPT_END {
            break;
        }
        out.push((code, body[at + 4..at + 4 + len].to_vec()));
        at += 4 + len + pad4(len);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_padded_and_framed() {
        let shb = section_header("hello", "Linux", "dropscope", Some(256)).unwrap();
        assert_eq!(shb.len(), 256);
        let idb = interface(LINKTYPE_ETHERNET, 128, "r0@dr-r", "veth", "Linux");
        let epb = packet(
            0,
            1_700_000_000_123_456_789,
            &[1, 2, 3],
            60,
            "cause=x",
            Some(Direction::Inbound),
        );
        let mut file = shb.clone();
        file.extend(&idb);
        file.extend(&epb);
        let b = blocks(&file);
        assert_eq!(
            b.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            [SHB, IDB, EPB]
        );
        let opts = options(&b[0].1, 16);
        assert_eq!(opts[0], (OPT_COMMENT, b"hello".to_vec()));
        let epb = &b[2].1;
        assert_eq!(
            u32::from_le_bytes(epb[12..16].try_into().unwrap()),
            3,
            "caplen"
        );
        assert_eq!(
            u32::from_le_bytes(epb[16..20].try_into().unwrap()),
            60,
            "orig len"
        );
        let ts = (u64::from(u32::from_le_bytes(epb[4..8].try_into().unwrap())) << 32)
            | u64::from(u32::from_le_bytes(epb[8..12].try_into().unwrap()));
        assert_eq!(ts, 1_700_000_000_123_456_789);
        let opts = options(epb, 20 + 4);
        assert_eq!(opts[0], (OPT_COMMENT, b"cause=x".to_vec()));
        assert_eq!(opts[1], (EPB_FLAGS, 1u32.to_le_bytes().to_vec()));
        assert!(
            section_header(&"x".repeat(300), "Linux", "d", Some(256)).is_none(),
            "too long for its room"
        );
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary() {
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
