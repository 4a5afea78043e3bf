//! The seccomp filter that traps a worker's `bind()`, and installing it in the worker's process
//! just before `exec`.
//!
//! Every other syscall is allowed by the program's first instructions, and since Linux 5.11 the
//! kernel's per-arch action cache skips the program altogether for syscalls whose answer does
//! not depend on their arguments: everything but `bind` here. A trapped `bind` is sent to the
//! master as a user notification (Linux ≥ 5.9 for ADDFD); the master answers it.
//!
//! Syscalls of another arch (a 64-bit process can still make i386 syscalls with `int 0x80`) are
//! allowed untouched: capture is a convenience, not a security boundary, and such a bind of a
//! public port simply fails with `EADDRINUSE`, as it would without capture. x32 syscalls
//! (`nr | __X32_SYSCALL_BIT`, same arch value) are the same calls with 32-bit pointers: an x32
//! `bind` is trapped too (the master reads its address the same way), the rest allowed.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::libc;

use crate::cbpf::*;

/// `offsetof(struct seccomp_data, nr)` and `arch`.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;

/// `AUDIT_ARCH_*` of the arch this binary runs as, and its `__NR_bind`.
#[cfg(target_arch = "x86_64")]
const ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "x86_64")]
const NR_BIND: u32 = 49;
/// x32's `bind` (`__X32_SYSCALL_BIT + 49`, the x86_64 number).
#[cfg(target_arch = "x86_64")]
const NR_BIND_X32: Option<u32> = Some(0x4000_0000 + 49);
#[cfg(target_arch = "aarch64")]
const ARCH: u32 = 0xC000_00B7;
#[cfg(target_arch = "aarch64")]
const NR_BIND: u32 = 200;
#[cfg(target_arch = "aarch64")]
const NR_BIND_X32: Option<u32> = None;

/// The program: another arch → allow; `bind` (or x32 `bind`) → notify; anything else → allow.
pub fn program() -> Vec<libc::sock_filter> {
    let allow = stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW);
    let notify = stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_USER_NOTIF);
    let mut p = vec![
        stmt(BPF_LD | BPF_W | BPF_ABS, ARCH_OFFSET),
        // Our arch: fall through; another: jump to the final allow.
        jump(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 0, 0),
        stmt(BPF_LD | BPF_W | BPF_ABS, NR_OFFSET),
    ];
    let mut binds = vec![NR_BIND];
    binds.extend(NR_BIND_X32);
    // Each `bind` number: equal → the notify just after the compares (counted from here).
    let n = binds.len();
    for (i, nr) in binds.into_iter().enumerate() {
        let to_notify = (n - 1 - i) as u8 + 1;
        p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, nr, to_notify, 0));
    }
    p.push(allow);
    p.push(notify);
    p.push(allow);
    // The arch check's false branch goes to the last instruction.
    let last = p.len() - 1;
    p[1].jf = (last - 2) as u8;
    p
}

/// Installs [`program`] on the calling thread (and what it execs and forks) and returns the
/// notification fd. Sets `PR_SET_NO_NEW_PRIVS` first, which seccomp requires without
/// `CAP_SYS_ADMIN`: from then on `execve` never grants privileges (setuid and setgid bits and
/// file capabilities are ignored), for the worker and everything it starts.
///
/// Only a single-threaded process that is about to exec (the shim's child) or a thread that is
/// about to end (the availability probe) may call this: the filter cannot be removed.
pub fn install() -> io::Result<OwnedFd> {
    let program = program();
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integers; seccomp(2) reads `prog`, which points
    // at `program`, alive for the call, and returns a new fd that nothing else owns.
    #[allow(unsafe_code)]
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &prog as *const libc::sock_fprog,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd as i32))
    }
}

/// Sends `fd` over the unix socket `channel` (one byte with SCM_RIGHTS).
pub fn send_fd(channel: i32, fd: &OwnedFd) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let fds = [fd.as_raw_fd()];
    let iov = [io::IoSlice::new(b"n")];
    sendmsg::<()>(
        channel,
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `program` over a `seccomp_data` the way the kernel does (only the loads, compares
    /// and returns it uses).
    fn run(arch: u32, nr: u32) -> u32 {
        let p = program();
        let mut pc = 0;
        let mut a = 0u32;
        loop {
            let i = p[pc];
            match i.code {
                c if c == BPF_LD | BPF_W | BPF_ABS => {
                    a = if i.k == ARCH_OFFSET { arch } else { nr };
                    pc += 1;
                }
                c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                    pc += 1 + usize::from(if a == i.k { i.jt } else { i.jf });
                }
                c if c == BPF_RET | BPF_K => return i.k,
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn only_bind_of_this_arch_is_trapped() {
        assert_eq!(run(ARCH, NR_BIND), libc::SECCOMP_RET_USER_NOTIF);
        if let Some(x32) = NR_BIND_X32 {
            assert_eq!(run(ARCH, x32), libc::SECCOMP_RET_USER_NOTIF);
        }
        for nr in [0, 1, 42, 43, 48, 50, 288, 0x4000_0000 + 42] {
            assert_eq!(run(ARCH, nr), libc::SECCOMP_RET_ALLOW, "nr {nr}");
        }
        // i386's socketcall / bind from a 64-bit process: another arch, allowed.
        assert_eq!(run(0x4000_0003, NR_BIND), libc::SECCOMP_RET_ALLOW);
        assert_eq!(run(0x4000_0003, 361), libc::SECCOMP_RET_ALLOW);
    }
}
