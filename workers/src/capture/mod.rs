//! Capture: clustering a worker that binds its own fixed port, with no code change, by
//! trapping its `bind()` with a seccomp user notification (`filter.rs`), answering it in the
//! master (`notify.rs`), and swapping its socket for the one the policy wants (`redirect.rs`).
//!
//! The path, end to end: the master gives the shim one end of a socketpair
//! ([`CHANNEL_ENV`]); the shim's child installs the filter just before `exec` and sends the
//! notification fd back on it (SCM_RIGHTS); [`spawn`](crate::spawn::spawn) receives it and the
//! worker's slot starts the task that answers its binds. `workers/LIFECYCLE.md` tells the story.

pub mod filter;
pub(crate) mod notify;
pub mod redirect;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use balancer_config::{App, Proto};

use redirect::{Redirect, To};

/// The env var naming the shim's fd (a unix socket) on which the notification fd is sent.
pub const CHANNEL_ENV: &str = "BALANCER_SHIM_CAPTURE";

/// Why capture cannot be used on this machine.
#[derive(Debug, Clone, thiserror::Error)]
#[error("this kernel or sandbox has no seccomp user notification ({0})")]
pub struct Unavailable(String);

/// Whether seccomp user notification works here, probed once per master: a short-lived thread
/// installs the filter on itself (a filter without `SECCOMP_FILTER_FLAG_TSYNC` binds only its
/// own thread, and it ends with it) and gets a notification fd back.
pub fn available() -> Result<(), Unavailable> {
    static PROBE: OnceLock<Result<(), Unavailable>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("capture-probe".into())
                .spawn(|| filter::install().map(drop))
                .map_err(|e| Unavailable(e.to_string()))?
                .join()
                .map_err(|_| Unavailable("the probe panicked".into()))?
                .map_err(|e| Unavailable(e.to_string()))
        })
        .clone()
}

/// The hook through which a worker's slot tells the master "app `APP` wants to listen on
/// `PROTO://ADDR`" (an app with no `listen`, whose worker just bound that address). It answers
/// at once whether the address is the app's public one: `true` for the first address learned
/// (the master then creates that listener and reloads the app onto it, in the background),
/// and for later binds of the same address; `false` for any other (that bind goes ahead).
pub type Learn = Arc<dyn Fn(&str, Proto, SocketAddr) -> bool + Send + Sync>;

/// How one worker's binds are answered.
pub enum Mode {
    /// The app's public addresses and where each one's bind goes.
    Redirect(Vec<Redirect>),
    /// The app has no `listen`: the first bind teaches the master its public address.
    Learn(Learn),
}

/// Whether `app` has no `listen` and would need capture to run more than one worker on the
/// port its program binds: the position where the public address is learned.
pub fn learns(app: &App) -> bool {
    app.listen.is_empty() && app.instances > 1
}

/// Why an app cannot start as configured with capture where it is.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// `capture = true`, or an app that needs it, where there is none (or it is off).
    #[error("app `{app}`: {why}, so balancer cannot capture its workers' bind(); {instead}")]
    Needed {
        /// The app.
        app: String,
        /// Off by config, or unavailable and why.
        why: String,
        /// What to do.
        instead: &'static str,
    },
}

/// What to do about an app whose workers bind the port themselves.
const GIVE_LISTEN: &str =
    "give the app `listen` and make it read $PORT (or accept on fd 3 with policy = \"reuseport\")";

/// Checks at start that `app` can have the capture it needs: `capture = true` where there is
/// none, and an app with no `listen` and several instances where capture is off or missing, are
/// refused (the second would otherwise crash-loop on EADDRINUSE, every worker but one).
pub fn check(app: &App) -> Result<(), CaptureError> {
    let why = match (app.capture, available()) {
        (Some(false), _) if learns(app) => format!(
            "{} instances and no `listen` need capture, which is off (capture = false)",
            app.instances
        ),
        (Some(false), _) => return Ok(()),
        (_, Err(e)) if app.capture == Some(true) || learns(app) => format!("{e}"),
        _ => return Ok(()),
    };
    Err(CaptureError::Needed {
        app: app.name.clone(),
        why,
        instead: if learns(app) {
            "give the app `listen` and make it read $PORT, or run one instance"
        } else {
            GIVE_LISTEN
        },
    })
}

/// How `app`'s next worker is captured, if at all: the redirects of its public addresses
/// (`addrs` its private addresses under rr, `sockets` its reuseport sockets), or learning
/// (no `listen`, several instances, a `learn` hook); `None` with capture off or unavailable.
pub(crate) fn mode(
    app: &App,
    learn: Option<&Learn>,
    addrs: &[SocketAddr],
    sockets: &[OwnedFd],
) -> Option<Mode> {
    if app.capture == Some(false) || available().is_err() {
        return None;
    }
    if !app.listen.is_empty() {
        return Some(Mode::Redirect(redirects(app, addrs, sockets)));
    }
    match learn {
        Some(learn) if learns(app) => Some(Mode::Learn(Arc::clone(learn))),
        _ => None,
    }
}

/// What each of the app's public addresses becomes when a worker binds it: its private
/// address (rr, `addrs`) or its socket in the reuseport group (`sockets`, duplicated).
fn redirects(app: &App, addrs: &[SocketAddr], sockets: &[OwnedFd]) -> Vec<Redirect> {
    let to: Vec<To> = if sockets.is_empty() {
        addrs.iter().map(|a| To::Private(*a)).collect()
    } else {
        sockets
            .iter()
            .filter_map(|fd| fd.try_clone().ok())
            .map(To::Socket)
            .collect()
    };
    app.listen
        .iter()
        .zip(to)
        .map(|(l, to)| Redirect {
            proto: l.proto,
            public: l.addr,
            to,
        })
        .collect()
}

/// Called by the shim's child just before `exec` when [`CHANNEL_ENV`] names a channel:
/// installs the filter and sends its fd to the master, then closes the channel. A failure is
/// told on stderr (the worker's error log) and the program runs uncaptured: the master sees
/// the channel close with no fd.
pub fn install_in_child(channel: i32) {
    match filter::install() {
        Ok(fd) => {
            if let Err(e) = filter::send_fd(channel, &fd) {
                eprintln!("balancer shim: cannot send the bind capture to the master: {e}");
            }
        }
        Err(e) => eprintln!("balancer shim: cannot capture binds: {e}"),
    }
    // SAFETY: the channel was handed to this process for this one use.
    #[allow(unsafe_code)]
    drop(unsafe { OwnedFd::from_raw_fd(channel) });
}

/// The master's end: receives the notification fd, or `None` when the child closed the
/// channel without one (capture failed there).
pub(crate) async fn receive(channel: OwnedFd) -> io::Result<Option<OwnedFd>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::AsRawFd;
    let stream = std::os::unix::net::UnixStream::from(channel);
    stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(stream)?;
    loop {
        stream.readable().await?;
        let mut byte = [0u8; 1];
        let mut iov = [io::IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let result = stream.try_io(tokio::io::Interest::READABLE, || {
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            let mut fd = None;
            for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(fds) = cmsg {
                    for raw in fds {
                        // SAFETY: SCM_RIGHTS just gave this process these fds.
                        #[allow(unsafe_code)]
                        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                        fd.get_or_insert(owned);
                    }
                }
            }
            Ok(fd)
        });
        match result {
            Ok(fd) => return Ok(fd),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn user_notification_works_here() {
        // The machines this is built on have it (Linux ≥ 5.9, no seccomp-denying sandbox).
        super::available().unwrap();
    }
}
