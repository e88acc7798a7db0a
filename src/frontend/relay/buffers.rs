//! Buffers: the per-thread spare read buffers and the in-place splice used to rewrite
//! messages.
//!
//! Read buffers between transactions. An idle session holds no buffer (the memory goal: a
//! thousand idle clients must not hold a thousand read buffers), so a transaction-mode session
//! takes two buffers per transaction and gives them back after it. Taking them from a small
//! per-thread stack of spares instead of the allocator saves a `malloc`/`free` pair of 16 KiB
//! each (which glibc serves from its bins, not its per-thread cache, and trims with `madvise`)
//! on every transaction. The stack is bounded, so it costs at most `MAX * READ_CHUNK` per
//! runtime thread, whatever the number of clients.

use std::cell::RefCell;

use bytes::BytesMut;

use super::READ_CHUNK;

/// Spares kept per thread: about the number of sessions one thread has mid-transaction.
const MAX: usize = 16;

thread_local! {
    static SPARES: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Make room to read into `buf`: take a spare buffer if it has none, else grow it when
/// less than 1 KiB is free.
pub(in crate::frontend::relay) fn make_room(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        *buf = SPARES
            .with(|s| s.borrow_mut().pop())
            .unwrap_or_else(|| BytesMut::with_capacity(READ_CHUNK));
    } else if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_CHUNK);
    }
}

/// Keep an empty buffer of the standard size as a spare; free anything else.
pub(in crate::frontend::relay) fn give(mut buf: BytesMut) {
    if !buf.is_empty() || buf.capacity() == 0 {
        return;
    }
    // An empty buffer that was advanced into reclaims its whole allocation here, without
    // allocating (it is the sole owner); grown buffers are not kept.
    buf.reserve(READ_CHUNK);
    if buf.capacity() != READ_CHUNK {
        return;
    }
    let _ = SPARES.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < MAX {
            s.push(buf);
        }
    });
}

/// Replace `remove` bytes at `at` with `insert`, moving the tail in place (no allocation
/// unless the buffer must grow).
pub(super) fn splice(buf: &mut BytesMut, at: usize, remove: usize, insert: &[u8]) {
    let old_len = buf.len();
    let tail = at + remove;
    if insert.len() > remove {
        let grow = insert.len() - remove;
        buf.resize(old_len + grow, 0);
        buf.copy_within(tail..old_len, tail + grow);
    } else if insert.len() < remove {
        let shrink = remove - insert.len();
        buf.copy_within(tail..old_len, tail - shrink);
        buf.truncate(old_len - shrink);
    }
    buf[at..at + insert.len()].copy_from_slice(insert);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_grows_shrinks_and_replaces() {
        let mut b = BytesMut::from(&b"abcdef"[..]);
        splice(&mut b, 2, 1, b"XYZ");
        assert_eq!(&b[..], b"abXYZdef");
        splice(&mut b, 2, 3, b"Q");
        assert_eq!(&b[..], b"abQdef");
        splice(&mut b, 0, 0, b"__");
        assert_eq!(&b[..], b"__abQdef");
        splice(&mut b, 6, 2, b"");
        assert_eq!(&b[..], b"__abQd");
    }
}
