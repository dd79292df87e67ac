//! `dropscope --licenses`: the licenses of dropscope and of the code built into it. The
//! binary (also the static one in the container image) carries them: btf-rs is
//! LGPL-2.1-or-later, whose terms ask for its notice and the license text with every copy.
pub const TEXT: &str = concat!(
    include_str!("../../NOTICE"),
    "\n\n",
    include_str!("../../LICENSE-MIT"),
    "\n\n",
    include_str!("../../licenses/LGPL-2.1.txt"),
);

#[cfg(test)]
mod tests {
    #[test]
    fn the_binary_carries_the_lgpl_notice_and_text() {
        assert!(super::TEXT.contains("btf-rs"));
        assert!(super::TEXT.contains("LGPL-2.1-or-later"));
        assert!(super::TEXT.contains("GNU LESSER GENERAL PUBLIC LICENSE"));
    }
}
