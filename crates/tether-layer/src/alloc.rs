//! The layer's own allocator: glibc's, under its `__libc_*` names, never the program's `malloc`.
//!
//! A program linked with jemalloc (bind9's dig, many Rust and C services) calls `readlink`
//! while jemalloc initialises, holding jemalloc's lock; a hook that then allocated through
//! `malloc` waited for that lock forever, before the program's `main`. glibc's allocator is
//! always loaded and independent of who interposes `malloc`, so the layer's allocations never
//! re-enter the program's allocator. Memory the program frees itself (`realpath`'s result) is
//! still taken from `malloc` explicitly, where it is made.

use std::{
    alloc::{GlobalAlloc, Layout},
    ffi::c_void,
};

unsafe extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_calloc(count: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(pointer: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
    fn __libc_free(pointer: *mut c_void);
}

/// What `malloc` guarantees on 64-bit glibc.
const MALLOC_ALIGN: usize = 16;

#[derive(Debug)]
pub(crate) struct LibcAllocator;

fn fits_malloc(layout: Layout) -> bool {
    layout.align() <= MALLOC_ALIGN && layout.align() <= layout.size()
}

// SAFETY: every block comes from glibc's allocator with at least the layout's alignment
// (`__libc_memalign` when `malloc`'s is not enough) and goes back to `__libc_free`, which frees
// blocks of both.
unsafe impl GlobalAlloc for LibcAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if fits_malloc(layout) {
            // SAFETY: a plain allocation of a non-zero size (GlobalAlloc's contract).
            unsafe { __libc_malloc(layout.size()) }.cast()
        } else {
            // SAFETY: the alignment is a power of two (Layout's invariant).
            unsafe { __libc_memalign(layout.align(), layout.size()) }.cast()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if fits_malloc(layout) {
            // SAFETY: as `alloc`; calloc zeroes the block.
            unsafe { __libc_calloc(1, layout.size()) }.cast()
        } else {
            // SAFETY: as `alloc`.
            let block: *mut u8 = unsafe { __libc_memalign(layout.align(), layout.size()) }.cast();
            if !block.is_null() {
                // SAFETY: `block` has `layout.size()` writable bytes.
                unsafe { block.write_bytes(0, layout.size()) };
            }
            block
        }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, _layout: Layout) {
        // SAFETY: `pointer` came from this allocator, i.e. from glibc's.
        unsafe { __libc_free(pointer.cast()) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        if fits_malloc(new_layout) {
            // SAFETY: `pointer` came from glibc's allocator; realloc keeps malloc's alignment.
            return unsafe { __libc_realloc(pointer.cast(), new_size) }.cast();
        }
        // SAFETY: GlobalAlloc's contract passed on: allocate anew, copy what fits, free the old.
        unsafe {
            let block = self.alloc(new_layout);
            if !block.is_null() {
                std::ptr::copy_nonoverlapping(pointer, block, layout.size().min(new_size));
                self.dealloc(pointer, layout);
            }
            block
        }
    }
}
