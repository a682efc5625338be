//! One reusable buffer for the host convs' padded inputs, held for the length of an encode or
//! decode.
//!
//! Each host conv builds a zero-padded copy of its input (hundreds of MB at the top of a decode)
//! and drops it when the conv is done. Large blocks go back to the OS when freed, so the next
//! conv's copy lands on fresh pages, and on the benchmark machine the kernel zeroes fresh pages
//! at under 1 GB/s: zeroing the padded inputs took 1.35 s of a 15 s decode, against ~10 ms for
//! the same bytes on pages already mapped. Keeping the last buffer while a [`Scope`] is open
//! removes most of that. Outside any scope nothing is kept, so the memory use of a program that
//! is not decoding is unchanged.

use rayon::prelude::*;
use std::cell::RefCell;

struct Pool {
    scopes: usize,
    spare: Option<Vec<f32>>,
}

// Per thread: an encode or decode builds its padded inputs on the thread that called it, and
// concurrent decodes on other threads then keep their own buffers.
thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool { scopes: 0, spare: None }) };
}

fn with_pool<R>(f: impl FnOnce(&mut Pool) -> R) -> R {
    POOL.with(|p| f(&mut p.borrow_mut()))
}

/// While alive, buffers returned with [`give`] on this thread are kept for the next [`zeroed`].
/// Scopes nest; the buffer is freed when the outermost one closes.
pub(crate) struct Scope(std::marker::PhantomData<*const ()>);

impl Scope {
    pub(crate) fn enter() -> Self {
        with_pool(|p| p.scopes += 1);
        Scope(std::marker::PhantomData)
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        with_pool(|p| {
            p.scopes -= 1;
            if p.scopes == 0 {
                p.spare = None;
            }
        })
    }
}

/// `len` zeros, in the kept buffer when it is large enough (see [`par_zeroed_in`]).
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    par_zeroed_in(with_pool(|p| p.spare.take()).unwrap_or_default(), len)
}

/// Hands `v` back for reuse while a scope is open (keeping the larger of it and the kept one);
/// frees it otherwise.
pub(crate) fn give(v: Vec<f32>) {
    with_pool(|p| {
        if p.scopes > 0 && p.spare.as_ref().is_none_or(|s| s.capacity() < v.capacity()) {
            p.spare = Some(v);
        }
    })
}

/// A zeroed buffer of `len` floats, zeroed by all threads: a fresh buffer's pages are faulted in
/// and cleared by whoever touches them first, which `vec![0.0; len]` does on one thread.
pub(crate) fn par_zeroed(len: usize) -> Vec<f32> {
    par_zeroed_in(Vec::new(), len)
}

/// `len` zeros in `v`'s memory when it holds that many, else in a fresh buffer (`v` is freed
/// first, so the two never add to the peak). Zeroed by all threads either way.
pub(crate) fn par_zeroed_in(mut v: Vec<f32>, len: usize) -> Vec<f32> {
    v.clear();
    if v.capacity() < len {
        drop(v);
        v = Vec::with_capacity(len);
    }
    v.spare_capacity_mut()[..len].par_chunks_mut(1 << 16).for_each(|c| {
        for e in c {
            e.write(0.0);
        }
    });
    // SAFETY: the first `len` elements were initialised above.
    unsafe { v.set_len(len) };
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_buffer_only_inside_a_scope() {
        let ptr = |v: &Vec<f32>| v.as_ptr() as usize;
        // No scope: nothing is kept.
        let mut a = zeroed(1000);
        a[3] = 1.0;
        give(a);
        assert!(with_pool(|p| p.spare.is_none()));
        {
            let _outer = Scope::enter();
            let mut a = zeroed(1000);
            a[3] = 1.0;
            let at = ptr(&a);
            give(a);
            // Reused, and zero again; a smaller request also reuses it.
            let b = zeroed(500);
            assert_eq!((ptr(&b), b.len()), (at, 500));
            assert!(b.iter().all(|&v| v == 0.0));
            give(b);
            {
                let _inner = Scope::enter();
            }
            // The inner scope's end does not free what the outer one keeps.
            assert!(with_pool(|p| p.spare.is_some()));
            // A larger request frees the kept buffer and makes a new one.
            let c = zeroed(5000);
            assert!(with_pool(|p| p.spare.is_none()));
            give(c);
        }
        assert!(with_pool(|p| p.spare.is_none()));
    }
}
