//! Reused chunk object buffers.
//!
//! Every chunk is built into a ~4 MiB buffer that lives until its PUT returns. A fresh buffer
//! costs a page fault and a zeroed page per 4 KiB on its first write (and, on VMs with free page
//! reporting, a host fault too), so the flusher keeps the buffers of uploaded chunks for the next
//! ones (docs/design/reused-chunk-buffers.md).

use std::sync::Mutex;

use bytes::Bytes;

/// Up to `max` empty buffers (length 0, capacity kept) for chunk objects.
///
/// Never holds more buffers than were alive at once: [`ObjectBuffers::take`] allocates only when
/// the pool is empty, so the peak memory of chunk objects is the same as without it.
#[derive(Debug)]
pub struct ObjectBuffers {
    free: Mutex<Vec<Vec<u8>>>,
    max: usize,
}

impl ObjectBuffers {
    /// An empty pool that keeps at most `max` buffers.
    pub fn new(max: usize) -> Self {
        Self {
            free: Mutex::new(Vec::new()),
            max,
        }
    }

    /// A kept buffer (empty, with its capacity), or a new empty one.
    pub fn take(&self) -> Vec<u8> {
        self.lock().pop().unwrap_or_default()
    }

    /// Keeps the buffer behind `object` for a later [`ObjectBuffers::take`] if nothing else
    /// refers to it (a backend may keep the object, e.g. the memory backend) and the pool has
    /// room; otherwise just drops this reference.
    pub fn give(&self, object: Bytes) {
        let Ok(mut buf) = object.try_into_mut() else {
            return;
        };
        // Empty first: converting to a Vec copies the contents into place otherwise.
        buf.clear();
        let buf = Vec::from(buf);
        let mut free = self.lock();
        if free.len() < self.max {
            free.push(buf);
        }
    }

    /// Drops every kept buffer (the flusher calls this when it goes idle).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Buffers kept now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// No buffer kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // The list stays consistent even if a holder panicked (push/pop/clear only).
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_comes_back_empty_with_its_capacity() {
        let pool = ObjectBuffers::new(2);
        let mut v = pool.take();
        assert_eq!(v.capacity(), 0);
        v.extend_from_slice(&[7u8; 5000]);
        let ptr = v.as_ptr();
        pool.give(Bytes::from(v));
        assert_eq!(pool.len(), 1);
        let again = pool.take();
        assert!(again.is_empty());
        assert!(again.capacity() >= 5000);
        assert_eq!(again.as_ptr(), ptr, "the same allocation");
        assert!(pool.is_empty());
    }

    /// `chunk::build` returns a slice of its buffer (the object starts at an aligned address
    /// inside it): the whole allocation still comes back.
    #[test]
    fn a_sliced_object_gives_back_its_whole_buffer() {
        let pool = ObjectBuffers::new(2);
        let mut v = pool.take();
        v.extend_from_slice(&[7u8; 9000]);
        let (ptr, cap) = (v.as_ptr(), v.capacity());
        let object = Bytes::from(v).slice(1000..);
        pool.give(object);
        assert_eq!(pool.len(), 1);
        let again = pool.take();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr, "the same allocation");
        assert_eq!(again.capacity(), cap);
    }

    #[test]
    fn a_shared_object_is_not_taken_and_the_pool_is_bounded() {
        let pool = ObjectBuffers::new(1);
        let object = Bytes::from(vec![1u8; 100]);
        let kept_elsewhere = object.clone();
        pool.give(object);
        assert!(pool.is_empty(), "another reference still reads it");
        assert_eq!(kept_elsewhere[..], [1u8; 100][..]);
        pool.give(Bytes::from(vec![2u8; 100]));
        pool.give(Bytes::from(vec![3u8; 100]));
        assert_eq!(pool.len(), 1);
        pool.clear();
        assert!(pool.is_empty());
    }
}
