//! Who is in a `SO_REUSEPORT` group, in the kernel's order, and which steering program that
//! order calls for.
//!
//! The kernel numbers a TCP group's sockets in `listen()` order and, when one closes, moves the
//! last into its slot; `Members::list` mirrors that, because the program returns indices into
//! the kernel's array and an index that is off by one sends connections to the wrong worker.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::bpf;

/// Identifies a socket within its group.
pub type MemberKey = u64;

/// What a member's socket may receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Its worker is starting: only probes go there, unless no worker is ready at all.
    Starting,
    /// Its worker is ready: new connections go there.
    Ready,
    /// Its worker is leaving: nothing new goes there.
    Leaving,
}

/// One socket of the group: the master's duplicate, and what it may receive.
#[derive(Debug)]
pub(super) struct Member {
    pub(super) key: MemberKey,
    pub(super) socket: Arc<OwnedFd>,
    pub(super) state: State,
    /// Another master's socket, handed over by `upgrade` (its worker is not ours).
    pub(super) adopted: bool,
    /// Its worker is ready, but the group is held (a master that has not taken over yet):
    /// it becomes `Ready` on release.
    pub(super) ready_on_release: bool,
}

/// The group's sockets in the kernel's order, and the probes in flight.
#[derive(Debug, Default)]
pub(super) struct Members {
    /// In the kernel's order.
    pub(super) list: Vec<Member>,
    /// Probes in flight: (source port, member).
    pub(super) probes: Vec<(u16, MemberKey)>,
    next_key: MemberKey,
}

impl Members {
    /// Where the member is in the kernel's order.
    pub(super) fn index(&self, key: MemberKey) -> Option<usize> {
        self.list.iter().position(|m| m.key == key)
    }

    /// Appends a starting member (the kernel appends a socket when it starts listening).
    pub(super) fn push(&mut self, socket: Arc<OwnedFd>) -> MemberKey {
        let key = self.next_key;
        self.next_key += 1;
        self.list.push(Member {
            key,
            socket,
            state: State::Starting,
            adopted: false,
            ready_on_release: false,
        });
        key
    }

    /// Appends a socket of the master before this one, its worker serving (`upgrade`).
    pub(super) fn adopt(&mut self, socket: Arc<OwnedFd>) -> MemberKey {
        let key = self.push(socket);
        if let Some(m) = self.list.last_mut() {
            m.state = State::Ready;
            m.adopted = true;
        }
        key
    }

    /// The master's duplicate of the member's socket.
    pub(super) fn socket(&self, key: MemberKey) -> Option<Arc<OwnedFd>> {
        self.index(key).map(|i| Arc::clone(&self.list[i].socket))
    }

    /// Whether a member other than `key` can take connections.
    pub(super) fn has_other_target(&self, key: MemberKey) -> bool {
        self.list
            .iter()
            .any(|m| m.key != key && m.state != State::Leaving)
    }

    /// The program for the current order, leaving out `also_avoid` (a slot about to change).
    pub(super) fn program(&self, also_avoid: Option<usize>) -> Option<Vec<nix::libc::sock_filter>> {
        let usable = |i: &usize| Some(*i) != also_avoid;
        let pick = |state: State| -> Vec<u32> {
            (0..self.list.len())
                .filter(usable)
                .filter(|&i| self.list[i].state == state)
                .map(|i| i as u32)
                .collect()
        };
        let mut targets = pick(State::Ready);
        if targets.is_empty() {
            // Nobody is ready: queue on starting workers rather than refuse or reset.
            targets = pick(State::Starting);
        }
        if targets.is_empty() {
            return None;
        }
        let probes: Vec<(u16, u32)> = self
            .probes
            .iter()
            .filter_map(|&(port, key)| Some((port, self.index(key)? as u32)))
            .filter(|(_, i)| usable(&(*i as usize)))
            .collect();
        Some(bpf::program(&probes, &targets))
    }
}
