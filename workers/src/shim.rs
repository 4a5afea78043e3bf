//! The worker shim: a small process between the master and each worker, which makes "workers
//! never outlive the master" true for the worker's whole process tree.
//!
//! `PR_SET_PDEATHSIG` reaches only a process's own parent, and killing the worker's process
//! group misses every descendant that left it (`setsid`, Node's `detached: true`, a daemonizing
//! helper). So each worker runs as the child of `balancer shim -- PROGRAM ARGS…`, which:
//!
//! - is a **child subreaper** (`PR_SET_CHILD_SUBREAPER`): whatever the worker's tree orphans is
//!   re-parented to the shim, not to init, so every process the worker ever started stays a
//!   descendant of the shim and can be found by walking `/proc` parent links;
//! - forks the program into a process group of its own, with `PR_SET_PDEATHSIG = SIGKILL`
//!   (the program dies with the shim), sets `LISTEN_PID` to the program's own pid when sockets
//!   were handed over (systemd's contract), and reports that pid to the master on a pipe, so
//!   `ls` shows the program, not the shim;
//! - when the master asks (`BALANCER_SHIM_CAPTURE`), installs the bind capture filter in the
//!   program's process just before `exec` and sends its notification fd to the master
//!   ([`crate::capture`]);
//! - forwards the signals the master sends (`kill_signal`, SIGHUP, …) to the program's group;
//! - when the program exits, kills every remaining descendant, then exits the way the program
//!   did (same code, or the same signal), so the master sees the program's own exit;
//! - when the master dies, even by SIGKILL, gets a real-time signal nobody else sends (its own
//!   `PR_SET_PDEATHSIG`), kills the program's group and every descendant, and exits.
//!
//! It runs before any runtime or thread exists in the process (`main` dispatches to [`run`]
//! first), so forking and allocating after the fork are safe here. It blocks the signals it
//! handles and takes them with `sigwaitinfo`, so there are no signal handlers at all.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};

/// The hidden subcommand the master runs this as.
pub const SUBCOMMAND: &str = "shim";
/// The env var naming the fd (a pipe) on which the shim reports the program's pid.
pub const REPORT_ENV: &str = "BALANCER_SHIM_REPORT";
/// The env var holding the master's pid, to notice a master that died before the shim started.
pub const MASTER_ENV: &str = "BALANCER_SHIM_MASTER";
/// Signals the master may send a worker on purpose; the shim passes them on.
const FORWARDED: [libc::c_int; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];
/// How many passes the final sweep makes, in case descendants fork while being killed.
const SWEEPS: usize = 50;

/// The signal the kernel sends the shim when the master dies: a real-time one, which nobody
/// sends by accident and which cannot be mistaken for a request to stop.
pub fn master_gone_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

/// Runs the shim for `argv` (program and arguments); never returns.
pub fn run(argv: &[OsString]) -> ! {
    let Some((program, args)) = argv.split_first() else {
        eprintln!("balancer shim: no program given");
        std::process::exit(2);
    };
    let handled = signal_set();
    let old_mask = block(&handled);
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes an integer and touches no memory of ours.
    #[allow(unsafe_code)]
    let subreaper = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if subreaper != 0 {
        eprintln!(
            "balancer shim: cannot become a subreaper: {}",
            std::io::Error::last_os_error()
        );
    }
    // The master may have died before the kernel armed our death signal.
    if let Some(master) = env_number(MASTER_ENV)
        && nix::unistd::getppid().as_raw() != master
    {
        std::process::exit(1);
    }
    let report = env_number(REPORT_ENV);
    let capture = env_number(crate::capture::CHANNEL_ENV);
    if let Some(fd) = capture {
        // Only the forked child uses the capture channel, and the program must not inherit it.
        let _ = nix::fcntl::fcntl(
            borrowed(fd),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
    if let Some(fd) = report {
        // The program must not inherit the report pipe.
        let _ = nix::fcntl::fcntl(
            borrowed(fd),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }

    // SAFETY: this process has one thread (no runtime was built), so the child may allocate
    // and call anything before it execs.
    #[allow(unsafe_code)]
    let child = match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Child) => exec_program(program, args, &old_mask, capture),
        Ok(ForkResult::Parent { child }) => {
            if let Some(fd) = capture {
                let _ = nix::unistd::close(fd);
            }
            child
        }
        Err(e) => {
            eprintln!("balancer shim: cannot fork: {e}");
            std::process::exit(1);
        }
    };
    if let Some(fd) = report {
        let line = format!("{}\n", child.as_raw());
        let _ = nix::unistd::write(borrowed(fd), line.as_bytes());
        let _ = nix::unistd::close(fd);
    }
    supervise(child, &handled)
}

/// In the forked child: a process group of its own, death with the shim, the signal mask the
/// shim inherited, `LISTEN_PID` when sockets were handed over, the bind capture filter when
/// the master asked for it (last, so nothing of the shim's own runs under it); then exec.
fn exec_program(
    program: &OsString,
    args: &[OsString],
    old_mask: &libc::sigset_t,
    capture: Option<i32>,
) -> ! {
    let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // SAFETY: restores a mask read by `block` before the fork.
    #[allow(unsafe_code)]
    unsafe {
        libc::sigprocmask(libc::SIG_SETMASK, old_mask, std::ptr::null_mut());
    }
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_remove(REPORT_ENV)
        .env_remove(MASTER_ENV)
        .env_remove(crate::capture::CHANNEL_ENV);
    if std::env::var_os("LISTEN_FDS").is_some() {
        cmd.env("LISTEN_PID", std::process::id().to_string());
    }
    if let Some(fd) = capture {
        crate::capture::install_in_child(fd);
    }
    let err = cmd.exec();
    eprintln!(
        "balancer: cannot run `{}`: {err}",
        program.to_string_lossy()
    );
    // 127, as a shell says "command not found".
    std::process::exit(127)
}

/// Waits for signals until the program has exited, then sweeps and exits like it.
fn supervise(child: Pid, handled: &libc::sigset_t) -> ! {
    loop {
        let signal = wait_signal(handled);
        if signal == master_gone_signal() {
            let _ = killpg(child, Signal::SIGKILL);
            let _ = kill(child, Signal::SIGKILL);
            sweep();
            std::process::exit(1);
        }
        if signal == libc::SIGCHLD {
            if let Some(status) = reap(child) {
                sweep();
                exit_like(status);
            }
            continue;
        }
        if let Ok(sig) = Signal::try_from(signal) {
            // The program's group; if it left it, the program itself.
            if killpg(child, sig) == Err(Errno::ESRCH) {
                let _ = kill(child, sig);
            }
        }
    }
}

/// Reaps every child that has exited; the program's status if it was among them.
fn reap(program: Pid) -> Option<WaitStatus> {
    let mut found = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return found,
            Ok(status) => {
                if status.pid() == Some(program)
                    && matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..))
                {
                    found = Some(status);
                }
            }
        }
    }
}

/// Kills every descendant left (they are all ours: orphans were re-parented here) and reaps
/// them, until none is left.
fn sweep() {
    let me = Pid::this();
    for _ in 0..SWEEPS {
        let left = descendants(me);
        if left.is_empty() {
            break;
        }
        for pid in &left {
            let _ = kill(*pid, Signal::SIGKILL);
        }
        // Orphans come here to be reaped; give the kernel a moment to deliver.
        std::thread::sleep(std::time::Duration::from_millis(10));
        let _ = reap(Pid::from_raw(0));
    }
    let _ = reap(Pid::from_raw(0));
}

/// Every process below `root`, by the parent links in `/proc/PID/stat`.
pub fn descendants(root: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(i32, i32)> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, parent_of(pid)?)))
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![root.as_raw()];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid) in &parents {
            if ppid == parent && !found.contains(&Pid::from_raw(pid)) {
                found.push(Pid::from_raw(pid));
                frontier.push(pid);
            }
        }
    }
    found
}

/// The parent pid of `pid` (field 4 of `/proc/PID/stat`, after the command name in parens).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// Exits with the program's code, or dies of the program's signal.
fn exit_like(status: WaitStatus) -> ! {
    match status {
        WaitStatus::Exited(_, code) => std::process::exit(code),
        WaitStatus::Signaled(_, signal, _) => {
            // SAFETY: resetting a disposition and unblocking a signal touch only kernel state.
            #[allow(unsafe_code)]
            unsafe {
                libc::signal(signal as libc::c_int, libc::SIG_DFL);
                let mut only: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut only);
                libc::sigaddset(&mut only, signal as libc::c_int);
                libc::sigprocmask(libc::SIG_UNBLOCK, &only, std::ptr::null_mut());
            }
            let _ = nix::sys::signal::raise(signal);
            std::process::exit(128 + signal as i32)
        }
        _ => std::process::exit(1),
    }
}

/// SIGCHLD, the forwarded signals, and the master's death signal.
fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a set we own.
    #[allow(unsafe_code)]
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in FORWARDED
            .into_iter()
            .chain([libc::SIGCHLD, master_gone_signal()])
        {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Blocks `set` (its signals are then taken with `sigwaitinfo`); returns the previous mask.
fn block(set: &libc::sigset_t) -> libc::sigset_t {
    // SAFETY: both sets are valid for the call; the old mask is written into `old`.
    #[allow(unsafe_code)]
    unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigprocmask(libc::SIG_BLOCK, set, &mut old);
        old
    }
}

/// The next pending signal of `set`.
fn wait_signal(set: &libc::sigset_t) -> libc::c_int {
    loop {
        // SAFETY: `set` is a valid signal set; no siginfo is asked for.
        #[allow(unsafe_code)]
        let signal = unsafe { libc::sigwaitinfo(set, std::ptr::null_mut()) };
        if signal > 0 {
            return signal;
        }
    }
}

fn env_number(name: &str) -> Option<i32> {
    std::env::var(name).ok()?.parse().ok()
}

fn borrowed(fd: i32) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: the fd was handed to this process by the master and stays open until `run`
    // closes it, after its last use.
    #[allow(unsafe_code)]
    unsafe {
        std::os::fd::BorrowedFd::borrow_raw(fd)
    }
}
