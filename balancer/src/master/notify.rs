//! The master's side of systemd's `Type=notify` protocol: `READY=1` once the first workers
//! are up, `RELOADING=1` + `MONOTONIC_USEC` around a SIGHUP reload, `STOPPING=1` at shutdown,
//! and `WATCHDOG=1` pings while `WATCHDOG_USEC` asks for them.
//!
//! The protocol is one datagram per message to the unix socket named by `$NOTIFY_SOCKET`
//! (a path, or an abstract name written `@name`). It is written by hand rather than through
//! the `sd-notify` crate because the worker side (`ready = "notify"`) needs the receiving end
//! of the same protocol anyway, and both fit in a few lines of `std`.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where systemd (or whatever stands in for it) listens, read once at start.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` asks for, or `None` when the master was not started by a
    /// service manager that wants notifications. A socket that cannot be reached is logged and
    /// treated as absent: the master serves the same either way.
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET").filter(|p| !p.is_empty())?;
        let addr = match address(path.as_encoded_bytes()) {
            Ok(addr) => addr,
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET={path:?} is not a usable address: {e}");
                return None;
            }
        };
        let socket = match UnixDatagram::unbound() {
            Ok(socket) => socket,
            Err(e) => {
                tracing::warn!("cannot create the sd_notify socket: {e}");
                return None;
            }
        };
        Some(Notifier {
            socket,
            addr,
            watchdog: watchdog_interval(),
        })
    }

    /// Sends one message (`"READY=1"`, or several `KEY=value` lines). Failures are logged,
    /// never fatal: a service manager that went away must not take the master with it.
    pub fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            tracing::warn!("sd_notify {message:?}: {e}");
        }
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC` systemd 253+ requires for `Type=notify-reload`
    /// and accepts (and ignores) otherwise.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// How often to ping, when `WatchdogSec=` is set: half the watchdog timeout, as
    /// `sd_watchdog_enabled(3)` advises, so one late tick is not yet a restart.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }
}

/// `$NOTIFY_SOCKET` as a socket address: `@name` is Linux's abstract namespace.
pub fn address(path: &[u8]) -> io::Result<SocketAddr> {
    match path.split_first() {
        Some((b'@', name)) => SocketAddr::from_abstract_name(name),
        _ => {
            use std::os::unix::ffi::OsStrExt;
            SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(path))
        }
    }
}

/// Half of `$WATCHDOG_USEC`, when it is set and meant for this process (`$WATCHDOG_PID`
/// absent or ours).
fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares reload stamps against.
fn monotonic_usec() -> u128 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => Duration::from(t).as_micros(),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_datagram_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).expect("bind");
        let notifier = Notifier {
            socket: UnixDatagram::unbound().expect("socket"),
            addr: address(path.as_os_str().as_encoded_bytes()).expect("address"),
            watchdog: None,
        };
        notifier.reloading();
        let mut buf = [0u8; 256];
        let n = receiver.recv(&mut buf).expect("recv");
        let text = std::str::from_utf8(&buf[..n]).expect("utf-8");
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let stamp = lines.next().and_then(|l| l.strip_prefix("MONOTONIC_USEC="));
        assert!(
            stamp
                .and_then(|s| s.parse::<u128>().ok())
                .is_some_and(|s| s > 0),
            "{text}"
        );
    }

    #[test]
    fn abstract_names_start_with_at() {
        let addr = address(b"@balancer-test").expect("address");
        assert_eq!(addr.as_abstract_name(), Some(&b"balancer-test"[..]));
    }
}
