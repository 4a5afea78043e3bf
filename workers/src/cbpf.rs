//! Classic BPF, as both our programs write it: the seccomp filter that traps `bind`
//! (`capture/filter.rs`) and the reuseport steering program (`reuseport/bpf.rs`). The opcode
//! bits (`linux/bpf_common.h`; libc does not export them for every target) and the two
//! instruction shapes.

use nix::libc;

pub(crate) const BPF_ABS: u16 = 0x20;
pub(crate) const BPF_ALU: u16 = 0x04;
pub(crate) const BPF_AND: u16 = 0x50;
pub(crate) const BPF_B: u16 = 0x10;
pub(crate) const BPF_H: u16 = 0x08;
pub(crate) const BPF_IND: u16 = 0x40;
pub(crate) const BPF_JA: u16 = 0x00;
pub(crate) const BPF_JEQ: u16 = 0x10;
pub(crate) const BPF_JMP: u16 = 0x05;
pub(crate) const BPF_K: u16 = 0x00;
pub(crate) const BPF_LD: u16 = 0x00;
pub(crate) const BPF_LSH: u16 = 0x60;
pub(crate) const BPF_MISC: u16 = 0x07;
pub(crate) const BPF_MOD: u16 = 0x90;
pub(crate) const BPF_RET: u16 = 0x06;
pub(crate) const BPF_RSH: u16 = 0x70;
pub(crate) const BPF_TAX: u16 = 0x00;
pub(crate) const BPF_W: u16 = 0x00;

/// An instruction that jumps nowhere (loads, ALU, returns).
pub(crate) fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// A conditional jump: `jt`/`jf` instructions forward when the test holds / fails.
pub(crate) fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}
