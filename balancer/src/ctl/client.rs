//! The CLI's side of the admin socket: a blocking client that sends one request line and reads
//! the reply line(s).
//!
//! Blocking std I/O on purpose: the CLI does one thing and exits, so it needs no runtime, and
//! `start` may call it before any runtime could exist (it launches the daemon).

use std::io::{self, BufRead, BufReader, Write};
use std::ops::ControlFlow;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::home::admin_socket;
use crate::protocol::{Reply, Request};

/// How long a reply may take. Generous because `reload` and `scale` answer only once the new
/// workers are ready (or have failed to be), which can take several `listen_timeout`s.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// How long sending a request may take: it is one short line, so a master that does not read
/// it within this is stuck.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket file, or nothing listening on it (a master that died without cleaning up).
    #[error("no master is running ({})", no_master_detail(socket, *stale))]
    NoMaster {
        /// The socket that was tried.
        socket: PathBuf,
        /// The socket file exists but nobody accepts on it.
        stale: bool,
    },
    /// The socket is there but could not be connected to (permissions, most likely).
    #[error("cannot connect to the admin socket {}", socket.display())]
    Connect {
        /// The socket that was tried.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// What answers on the socket is not a master of this user: its reply is not trusted.
    #[error(
        "the admin socket {} is served by uid {uid}, not by this user (uid {me}); refusing to trust it",
        socket.display()
    )]
    Impostor {
        /// The socket that was tried.
        socket: PathBuf,
        /// Who serves it.
        uid: u32,
        /// Who we are.
        me: u32,
    },
    /// The request could not be written.
    #[error("cannot send the request to the master")]
    Send(#[source] io::Error),
    /// The reply could not be read.
    #[error("cannot read the master's reply")]
    Receive(#[source] io::Error),
    /// The master accepted the request but did not answer in time.
    #[error("the master did not reply within {}", humantime::format_duration(*after))]
    Timeout {
        /// The time waited.
        after: Duration,
    },
    /// The master hung up before replying (it crashed, or is shutting down).
    #[error("the master closed the connection without replying")]
    Closed,
    /// The reply is not the JSON this client understands (a master of another version?).
    #[error("the master's reply is not understood: {line}")]
    BadReply {
        /// The line received.
        line: String,
        /// What is wrong with it.
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// Whether this means no master is running (as opposed to one that misbehaved).
    pub fn is_no_master(&self) -> bool {
        matches!(self, ClientError::NoMaster { .. })
    }
}

fn no_master_detail(socket: &Path, stale: bool) -> String {
    if stale {
        format!("nothing answers on the admin socket {}", socket.display())
    } else {
        format!("no admin socket at {}", socket.display())
    }
}

/// One connection to a master.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to the master whose home is `home`.
    pub fn connect(home: &Path) -> Result<Client, ClientError> {
        let socket = admin_socket(home);
        let stream = UnixStream::connect(&socket).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ClientError::NoMaster {
                socket: socket.clone(),
                stale: false,
            },
            io::ErrorKind::ConnectionRefused => ClientError::NoMaster {
                socket: socket.clone(),
                stale: true,
            },
            _ => ClientError::Connect {
                socket: socket.clone(),
                source,
            },
        })?;
        // Anyone who could swap the socket file could answer `kill` with "done" while the real
        // master runs on: the peer must be this user (the master runs as its user, or root as
        // root).
        let peer =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                .map_err(|e| ClientError::Connect {
                    socket: socket.clone(),
                    source: e.into(),
                })?;
        let me = nix::unistd::geteuid().as_raw();
        if peer.uid() != me {
            return Err(ClientError::Impostor {
                socket,
                uid: peer.uid(),
                me,
            });
        }
        let writer = stream.try_clone().map_err(|source| ClientError::Connect {
            socket: socket.clone(),
            source,
        })?;
        writer
            .set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(ClientError::Send)?;
        Ok(Client {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends `request` and waits up to `timeout` (`None`: forever) for its one reply.
    pub fn call(
        &mut self,
        request: &Request,
        timeout: Option<Duration>,
    ) -> Result<Reply, ClientError> {
        self.send(request)?;
        self.set_timeout(timeout)?;
        self.receive(timeout)?.ok_or(ClientError::Closed)
    }

    /// Sends `request` and hands every reply to `on_reply` until it returns
    /// [`ControlFlow::Break`] or the master closes the connection. No timeout: a followed log
    /// may be quiet for hours.
    pub fn stream(
        &mut self,
        request: &Request,
        mut on_reply: impl FnMut(Reply) -> ControlFlow<()>,
    ) -> Result<(), ClientError> {
        self.send(request)?;
        self.set_timeout(None)?;
        while let Some(reply) = self.receive(None)? {
            if on_reply(reply).is_break() {
                break;
            }
        }
        Ok(())
    }

    /// Sends `request` and leaves its replies to [`next_reply`](Self::next_reply): a stream
    /// read from another thread (`monit`'s subscription).
    pub fn open_stream(&mut self, request: &Request) -> Result<(), ClientError> {
        self.send(request)?;
        self.set_timeout(None)
    }

    /// The next reply of a stream opened with [`open_stream`](Self::open_stream); `None` at
    /// its end.
    pub fn next_reply(&mut self) -> Result<Option<Reply>, ClientError> {
        self.receive(None)
    }

    /// Another handle on this connection: shutting it down ends a [`next_reply`] blocked in
    /// another thread.
    ///
    /// [`next_reply`]: Self::next_reply
    pub fn handle(&self) -> io::Result<UnixStream> {
        self.writer.try_clone()
    }

    fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        // Serialising a `Request` cannot fail (no maps with non-string keys, no foreign types),
        // but an error here is still reported rather than unwrapped.
        let mut line = serde_json::to_vec(request)
            .map_err(|e| ClientError::Send(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .and_then(|()| self.writer.flush())
            .map_err(ClientError::Send)
    }

    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.reader
            .get_ref()
            .set_read_timeout(timeout)
            .map_err(ClientError::Receive)
    }

    /// The next reply, or `None` at end of stream.
    fn receive(&mut self, timeout: Option<Duration>) -> Result<Option<Reply>, ClientError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ClientError::Timeout {
                    after: timeout.unwrap_or_default(),
                });
            }
            Err(e) => return Err(ClientError::Receive(e)),
        }
        let text = line.trim_end_matches(['\n', '\r']);
        serde_json::from_str(text)
            .map(Some)
            .map_err(|source| ClientError::BadReply {
                line: text.to_owned(),
                source,
            })
    }
}

/// Connects, sends `request`, and returns its reply (waiting up to [`REPLY_TIMEOUT`]).
pub fn request(home: &Path, request: &Request) -> Result<Reply, ClientError> {
    request_within(home, request, REPLY_TIMEOUT)
}

/// Like [`request`], with another timeout (`ping` uses a short one).
pub fn request_within(
    home: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Reply, ClientError> {
    Client::connect(home)?.call(request, Some(timeout))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A one-connection fake master: reads one request line, answers with `replies`, and
    /// returns the request it read.
    fn fake_master(home: &Path, replies: Vec<&'static str>) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(admin_socket(home)).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut writer = stream;
            for reply in replies {
                // The client may hang up early (a stream it stopped): that is fine.
                if writeln!(writer, "{reply}").is_err() {
                    break;
                }
            }
            line
        })
    }

    #[test]
    fn no_socket_means_no_master() {
        let home = tempfile::tempdir().unwrap();
        let err = request(home.path(), &Request::Ping).unwrap_err();
        assert!(err.is_no_master());
        let expected = format!(
            "no master is running (no admin socket at {})",
            home.path().join("admin.sock").display()
        );
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn a_stale_socket_means_no_master() {
        let home = tempfile::tempdir().unwrap();
        drop(UnixListener::bind(admin_socket(home.path())).unwrap());
        let err = request(home.path(), &Request::Ping).unwrap_err();
        assert!(
            matches!(err, ClientError::NoMaster { stale: true, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn one_request_one_reply() {
        let home = tempfile::tempdir().unwrap();
        let master = fake_master(
            home.path(),
            vec![r#"{"ok":true,"pid":42,"version":"0.1.0","future_field":1}"#],
        );
        let reply = request(home.path(), &Request::Ping).unwrap();
        assert!(
            matches!(reply, Reply::Pong(ref p) if p.pid == 42),
            "{reply:?}"
        );
        assert_eq!(master.join().unwrap(), "{\"cmd\":\"ping\"}\n");
    }

    #[test]
    fn a_silent_master_times_out_and_a_closed_one_is_reported() {
        let home = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(admin_socket(home.path())).unwrap();
        let err =
            request_within(home.path(), &Request::Ping, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
        drop(listener);

        let home = tempfile::tempdir().unwrap();
        let master = fake_master(home.path(), vec![]);
        let err = request(home.path(), &Request::List).unwrap_err();
        assert!(matches!(err, ClientError::Closed), "{err:?}");
        master.join().unwrap();
    }

    #[test]
    fn garbage_is_a_bad_reply() {
        let home = tempfile::tempdir().unwrap();
        let master = fake_master(home.path(), vec!["not json"]);
        let err = request(home.path(), &Request::List).unwrap_err();
        assert!(matches!(err, ClientError::BadReply { .. }), "{err:?}");
        master.join().unwrap();
    }

    #[test]
    fn a_stream_ends_when_the_callback_says_so_or_the_master_hangs_up() {
        let home = tempfile::tempdir().unwrap();
        let lines = vec![
            r#"{"ok":true,"log":{"app":"web","instance":0,"stream":"out","line":"a"}}"#,
            r#"{"ok":true,"log":{"app":"web","instance":1,"stream":"err","line":"b"}}"#,
            r#"{"ok":true,"done":true}"#,
            r#"{"ok":true,"log":{"app":"web","instance":0,"stream":"out","line":"never"}}"#,
        ];
        let master = fake_master(home.path(), lines);
        let mut seen = Vec::new();
        let request = Request::Logs {
            target: None,
            lines: 15,
            follow: false,
        };
        Client::connect(home.path())
            .unwrap()
            .stream(&request, |reply| match reply {
                Reply::Log(log) => {
                    seen.push(log.line);
                    ControlFlow::Continue(())
                }
                _ => ControlFlow::Break(()),
            })
            .unwrap();
        assert_eq!(seen, ["a", "b"]);
        assert_eq!(
            master.join().unwrap(),
            "{\"cmd\":\"logs\",\"lines\":15,\"follow\":false}\n"
        );

        let home = tempfile::tempdir().unwrap();
        let master = fake_master(home.path(), vec![r#"{"ok":true}"#]);
        let mut count = 0;
        Client::connect(home.path())
            .unwrap()
            .stream(&Request::List, |_| {
                count += 1;
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(count, 1);
        master.join().unwrap();
    }
}
