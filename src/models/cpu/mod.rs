//! The CPU forward pass, ours to own: NHWC feature maps, weights packed once at load, one
//! matrix-product microkernel per instruction set, Winograd F(4,3) for 3×3 convolutions.
//!
//! - [`simd`]: the vector operations, for AVX-512, AVX2+FMA and plain scalar code.
//! - [`gemm`]: `C = A·B` with `B` (weights) packed at load and `A` read in place; bias and ReLU
//!   fused into the store.
//! - [`conv`]: a convolution packed for the CPU ([`CpuConv`]): 1×1 as one product over the
//!   feature map, 3×3 through Winograd F(4,3), anything else through im2col, each with bias and
//!   ReLU fused; results may be written into a channel slice of a wider map, which is how
//!   GoogLeNet's branches concatenate without a copy.
//! - [`pool`]: max pooling (PyTorch's ceil mode and padding) and adaptive average pooling on
//!   NHWC maps.
//!
//! The instruction set is chosen at run time ([`Isa::best`], or `CNNSERVE_CPU_ISA` to cap it);
//! nothing is compiled for the build machine's CPU. Work is split across the caller's rayon pool,
//! one parallel region per layer, and every output element is summed in one fixed order, so the
//! results do not depend on the thread count.

pub mod bf16;
pub mod conv;
pub mod gemm;
pub mod pool;
pub mod simd;

use std::sync::OnceLock;

pub use conv::{run_together, ConvKind, ConvRun, CpuConv};

/// An instruction set the kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the kernels of `self`.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest available instruction set, capped by `CNNSERVE_CPU_ISA` (`avx512`, `avx2`,
    /// `scalar`) when set; detected once.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let cap = std::env::var("CNNSERVE_CPU_ISA")
                .ok()
                .and_then(|v| Isa::ALL.into_iter().find(|i| i.name() == v.trim()))
                .unwrap_or(Isa::Avx512);
            Isa::ALL
                .into_iter()
                .rev()
                .find(|i| *i <= cap && i.is_available())
                .unwrap_or(Isa::Scalar)
        })
    }
}

/// Defines `pub unsafe fn $name(isa, args…)` that runs `$generic::<S, MR, NV>(args…)` compiled
/// for `isa`: AVX-512 with a 12×16 register block, AVX2+FMA with 6×16, scalar with 4×16.
macro_rules! isa_dispatch {
    ($(#[$meta:meta])* $vis:vis unsafe fn $name:ident = $generic:ident ( $($arg:ident : $ty:ty),* $(,)? )) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis unsafe fn $name(isa: $crate::models::cpu::Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($arg: $ty),*) {
                $generic::<$crate::models::cpu::simd::Avx512, 12, 1>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) {
                $generic::<$crate::models::cpu::simd::Avx2, 6, 2>($($arg),*)
            }
            #[allow(clippy::too_many_arguments)]
            unsafe fn scalar($($arg: $ty),*) {
                $generic::<$crate::models::cpu::simd::Scalar, 4, 16>($($arg),*)
            }
            match isa {
                #[cfg(target_arch = "x86_64")]
                $crate::models::cpu::Isa::Avx512 => avx512($($arg),*),
                #[cfg(target_arch = "x86_64")]
                $crate::models::cpu::Isa::Avx2 => avx2($($arg),*),
                _ => scalar($($arg),*),
            }
        }
    };
}
pub(crate) use isa_dispatch;

/// An NHWC feature map seen through a pointer: `n` images of `h × w` pixels, `c` channels per
/// pixel, consecutive pixels `stride` floats apart (`stride > c` for a channel slice of a wider
/// map).
#[derive(Debug, Clone, Copy)]
pub struct Map {
    pub ptr: *mut f32,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub stride: usize,
}

// SAFETY: a Map is a view handed to kernels that write disjoint parts of it; whoever makes one
// keeps the memory alive and unaliased for the kernel's duration.
unsafe impl Send for Map {}
unsafe impl Sync for Map {}

impl Map {
    pub fn pixels(&self) -> usize {
        self.n * self.h * self.w
    }

    /// Channels `start..start + c` of every pixel.
    pub fn channels(self, start: usize, c: usize) -> Map {
        assert!(start + c <= self.c, "channel slice out of range");
        Map {
            // SAFETY: in bounds of the pixel's channels, checked above.
            ptr: unsafe { self.ptr.add(start) },
            c,
            ..self
        }
    }

    /// # Safety
    /// `(img, y, x)` must be inside the map.
    #[inline(always)]
    pub unsafe fn at(&self, img: usize, y: usize, x: usize) -> *mut f32 {
        self.ptr
            .add(((img * self.h + y) * self.w + x) * self.stride)
    }
}

/// An owned NHWC feature map. Its buffer comes from, and goes back to, a pool kept by the
/// process: after the first pass of a shape, no layer allocates (a
/// fresh buffer costs a page fault per 4 KiB, which is most of a large layer's time).
/// [`release_buffers`] empties the pool.
#[derive(Debug, Default)]
pub struct Act {
    buf: Vec<f32>,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Act {
    /// A map of unspecified contents: every element must be written before it is read.
    pub fn new(n: usize, h: usize, w: usize, c: usize) -> Self {
        Self {
            buf: take_buffer(n * h * w * c),
            n,
            h,
            w,
            c,
        }
    }

    /// A map of zeros.
    pub fn zeros(n: usize, h: usize, w: usize, c: usize) -> Self {
        let mut act = Self::new(n, h, w, c);
        act.data_mut().fill(0.0);
        act
    }

    pub fn len(&self) -> usize {
        self.n * self.h * self.w * self.c
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn data(&self) -> &[f32] {
        &self.buf[..self.len()]
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        let len = self.len();
        &mut self.buf[..len]
    }

    pub fn map(&mut self) -> Map {
        Map {
            ptr: self.buf.as_mut_ptr(),
            n: self.n,
            h: self.h,
            w: self.w,
            c: self.c,
            stride: self.c,
        }
    }

    /// From NCHW `[n, c, h, w]` data.
    pub fn from_nchw(data: &[f32], n: usize, c: usize, h: usize, w: usize) -> Self {
        Self::from_nchw_with(data, (n, c, h, w), |_, v| v)
    }

    /// From NCHW data, each element mapped through `f(channel, value)`.
    pub fn from_nchw_with(
        data: &[f32],
        (n, c, h, w): (usize, usize, usize, usize),
        f: impl Fn(usize, f32) -> f32,
    ) -> Self {
        let mut out = Self::new(n, h, w, c);
        let dst = out.data_mut();
        for img in 0..n {
            for ch in 0..c {
                let plane = &data[(img * c + ch) * h * w..][..h * w];
                for (p, &v) in plane.iter().enumerate() {
                    dst[(img * h * w + p) * c + ch] = f(ch, v);
                }
            }
        }
        out
    }

    /// `[n, c·h·w]` in PyTorch's flatten order (channel-major).
    pub fn to_nchw(&self) -> Vec<f32> {
        let (hw, c) = (self.h * self.w, self.c);
        let data = self.data();
        let mut out = vec![0f32; data.len()];
        for img in 0..self.n {
            for p in 0..hw {
                let src = &data[(img * hw + p) * c..][..c];
                for (ch, &v) in src.iter().enumerate() {
                    out[(img * c + ch) * hw + p] = v;
                }
            }
        }
        out
    }
}

impl Drop for Act {
    fn drop(&mut self) {
        give_buffer(std::mem::take(&mut self.buf));
    }
}

/// Buffers kept for the next forward passes: enough for the live maps of the largest layers of
/// a few passes at once, never more than this many.
const POOLED_BUFFERS: usize = 12;

static POOL: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

fn pool() -> std::sync::MutexGuard<'static, Vec<Vec<f32>>> {
    // The pool holds plain buffers: one left mid-update by a panic is still a valid buffer.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The smallest pooled buffer that holds `len` floats (its length may be larger), or a new one.
fn take_buffer(len: usize) -> Vec<f32> {
    let reused = {
        let mut pool = pool();
        (0..pool.len())
            .filter(|&i| pool[i].len() >= len)
            .min_by_key(|&i| pool[i].len())
            .map(|best| pool.swap_remove(best))
    };
    reused.unwrap_or_else(|| vec![0f32; len])
}

fn give_buffer(buf: Vec<f32>) {
    if buf.is_empty() {
        return;
    }
    let mut pool = pool();
    pool.push(buf);
    if pool.len() > POOLED_BUFFERS {
        let smallest = (0..pool.len()).min_by_key(|&i| pool[i].len()).unwrap_or(0);
        pool.swap_remove(smallest);
    }
}

/// `len` zeros in memory whose pages are all mapped in one call: weights run to hundreds of MB,
/// and faulting them in 4 KiB at a time is most of a model's load time.
pub fn zeroed(len: usize) -> Vec<f32> {
    let mut v = populated(len);
    v.resize(len, 0.0);
    v
}

/// Little-endian f32 bytes (a weights file's tensor) as floats, in pre-populated memory.
pub fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    let len = bytes.len() / 4;
    let mut v = populated(len);
    if cfg!(target_endian = "little") {
        // SAFETY: `v` has room for `len` floats, every byte of which is written before set_len.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr().cast::<u8>(), len * 4);
            v.set_len(len);
        }
    } else {
        v.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    v
}

/// An empty vector with room for `len` floats whose pages are already mapped (Linux 5.14+;
/// elsewhere, or when refused, they fault in as usual).
fn populated(len: usize) -> Vec<f32> {
    let v: Vec<f32> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    if len * 4 >= 1 << 20 {
        const PAGE: usize = 4096;
        let start = (v.as_ptr() as usize).next_multiple_of(PAGE);
        let end = (v.as_ptr() as usize + len * 4) & !(PAGE - 1);
        if end > start {
            // SAFETY: whole pages inside our own allocation; the kernel only maps them.
            unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    end - start,
                    libc::MADV_POPULATE_WRITE,
                );
            }
        }
    }
    v
}

/// Frees the pooled feature-map buffers and every pool thread's scratch, and hands free heap
/// memory back to the system (a model worker does this when it goes idle, so an idle server
/// holds its weights and little else).
pub fn release_buffers() {
    let freed = std::mem::take(&mut *pool());
    drop(freed);
    rayon::broadcast(|_| {
        SCRATCH.with(|s| *s.borrow_mut() = [Vec::new(), Vec::new()]);
    });
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's heaps to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs `f` on a thread of the current rayon pool, so that the parallel regions inside it are
/// split from within the pool rather than handed over from outside for each layer.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::join(f, || ()).0
    }
}

/// How many parallel jobs a layer of `rows` rows (pixels or tiles) and `panels` column panels
/// is cut into: row blocks of at most `block` rows, and, when there are too few of them to keep
/// every thread busy, column ranges too. Returns (row block, panels per job).
pub(crate) fn split(rows: usize, panels: usize, block: usize) -> (usize, usize) {
    let threads = rayon::current_num_threads().max(1);
    let want = 2 * threads;
    let row_block = block.min(rows.div_ceil(want).next_multiple_of(12)).max(12);
    let row_jobs = rows.div_ceil(row_block);
    if row_jobs >= want || panels <= 1 {
        return (row_block, panels.max(1));
    }
    let chunks = want.div_ceil(row_jobs).min(panels);
    (row_block, panels.div_ceil(chunks))
}

thread_local! {
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// Two per-thread scratch buffers of at least `a` and `b` floats, reused from call to call.
pub(crate) fn with_scratch<R>(a: usize, b: usize, f: impl FnOnce(*mut f32, *mut f32) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let [x, y] = &mut *s;
        if x.len() < a {
            x.resize(a, 0.0);
        }
        if y.len() < b {
            y.resize(b, 0.0);
        }
        f(x.as_mut_ptr(), y.as_mut_ptr())
    })
}
