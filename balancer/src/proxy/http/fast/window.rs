//! The bytes a fast-path connection has read and not used yet, in a buffer borrowed from the
//! thread's pool ([`Loan`]) while there are any: an idle keep-alive connection holds none.
//! A head longer than the pooled buffer moves to a larger one of its own, up to a limit.

use crate::proxy::copy::{BUFFER_SIZE, Loan};

/// `store[start..end]` are the bytes read and not used yet.
pub(crate) struct Window {
    store: Store,
    start: usize,
    end: usize,
}

enum Store {
    None,
    Loan(Loan),
    Owned(Vec<u8>),
}

impl Store {
    fn bytes(&self) -> &[u8] {
        match self {
            Store::None => &[],
            Store::Loan(loan) => loan.bytes(),
            Store::Owned(v) => v,
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Store::None => &mut [],
            Store::Loan(loan) => loan.buf(),
            Store::Owned(v) => v,
        }
    }
}

impl Window {
    pub(crate) fn new() -> Self {
        Window {
            store: Store::None,
            start: 0,
            end: 0,
        }
    }

    /// A window over `bytes`.
    #[cfg(test)]
    fn from_vec(bytes: Vec<u8>) -> Self {
        let end = bytes.len();
        Window {
            store: Store::Owned(bytes),
            start: 0,
            end,
        }
    }

    /// The bytes not used yet.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.store.bytes()[self.start..self.end]
    }

    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Marks the first `n` bytes used; an emptied window gives its buffer back.
    pub(crate) fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
        if self.is_empty() {
            self.clear();
        }
    }

    /// Drops every byte and the buffer.
    pub(crate) fn clear(&mut self) {
        self.store = Store::None;
        self.start = 0;
        self.end = 0;
    }

    /// Room to read into after the bytes held, so that they may grow to `limit` in all:
    /// `None` once they fill it. Takes a pooled buffer if none is held, and moves the bytes to
    /// the front, or to a larger buffer, when the room at the end runs out.
    pub(crate) fn spare(&mut self, limit: usize) -> Option<&mut [u8]> {
        let len = self.len();
        if len >= limit {
            return None;
        }
        let capacity = self.store.bytes().len();
        if self.end == capacity {
            if matches!(self.store, Store::None) {
                self.store = Store::Loan(Loan::take());
            } else if self.start > 0 {
                self.store.bytes_mut().copy_within(self.start..self.end, 0);
            } else {
                let bigger = (capacity * 2).clamp(BUFFER_SIZE, limit.max(BUFFER_SIZE));
                let mut grown = vec![0u8; bigger];
                grown[..len].copy_from_slice(self.bytes());
                self.store = Store::Owned(grown);
            }
            self.end -= self.start;
            self.start = 0;
        }
        let room = (limit - len).min(self.store.bytes().len() - self.end);
        let end = self.end;
        Some(&mut self.store.bytes_mut()[end..end + room])
    }

    /// `n` bytes were read into the room [`spare`](Self::spare) gave.
    pub(crate) fn filled(&mut self, n: usize) {
        self.end += n;
    }

    /// The bytes not used yet, for another reader (hyper).
    pub(crate) fn into_vec(self) -> Vec<u8> {
        self.bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(w: &mut Window, limit: usize, bytes: &[u8]) -> usize {
        let room = w.spare(limit).unwrap();
        let n = room.len().min(bytes.len());
        room[..n].copy_from_slice(&bytes[..n]);
        w.filled(n);
        n
    }

    #[test]
    fn a_window_compacts_grows_to_its_limit_and_gives_its_buffer_back() {
        let mut w = Window::new();
        assert!(w.is_empty());
        let pattern: Vec<u8> = (0..3 * BUFFER_SIZE).map(|i| (i % 251) as u8).collect();
        // Fill the pooled buffer, use some, then read on: the rest moves to the front.
        assert_eq!(push(&mut w, 4 * BUFFER_SIZE, &pattern), BUFFER_SIZE);
        w.consume(100);
        assert_eq!(push(&mut w, 4 * BUFFER_SIZE, &pattern[BUFFER_SIZE..]), 100);
        assert_eq!(&w.bytes()[..10], &pattern[100..110]);
        assert_eq!(w.len(), BUFFER_SIZE);
        // Full with nothing used: a larger buffer, the bytes kept.
        let n = push(&mut w, 3 * BUFFER_SIZE, &pattern[BUFFER_SIZE + 100..]);
        assert_eq!(n, BUFFER_SIZE);
        assert_eq!(w.bytes(), &pattern[100..2 * BUFFER_SIZE + 100]);
        // The limit is a limit.
        push(&mut w, 2 * BUFFER_SIZE + 50, &pattern);
        assert_eq!(w.len(), 2 * BUFFER_SIZE + 50);
        assert!(w.spare(2 * BUFFER_SIZE + 50).is_none());
        w.consume(w.len());
        assert!(w.is_empty() && matches!(w.store, Store::None));
    }

    #[test]
    fn a_window_over_left_bytes_reads_on_after_them() {
        let mut w = Window::from_vec(b"GET / HT".to_vec());
        push(&mut w, 1024, b"TP/1.1\r\n\r\n");
        assert_eq!(w.bytes(), b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(w.into_vec(), b"GET / HTTP/1.1\r\n\r\n");
    }
}
