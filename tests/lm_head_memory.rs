//! The LM head's memory does not grow with batch × vocabulary × hidden: prefill feeds it the last
//! position of every row, a strided view, and a batched matmul of such a view against the
//! broadcast vocabulary matrix would copy that matrix once per row (~7.5 GB at 16 rows for the
//! 2B). Measured with a counting allocator on a real checkpoint.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use vigil::model::VideoLlama3ForConditionalGeneration;

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes allocated at the peak of `f`, above what was live before it.
fn peak_of(f: impl FnOnce()) -> usize {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    f();
    PEAK.load(Ordering::SeqCst) - base
}

#[test]
fn lm_head_on_the_last_positions_does_not_copy_the_vocabulary_per_row() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/tiny_b");
    let model = VideoLlama3ForConditionalGeneration::from_pretrained(&dir, DType::F32, &Device::Cpu).unwrap();
    let t = &model.config().text_config;
    let (vocab, hidden) = (t.vocab_size, t.hidden_size);
    let extra = |batch: usize| {
        let states = Tensor::randn(0f32, 1.0, (batch, 7, hidden), &Device::Cpu).unwrap();
        let last = states.narrow(1, 6, 1).unwrap();
        peak_of(|| {
            let logits = model.lm_head(&last).unwrap();
            assert_eq!(logits.dims(), &[batch, 1, vocab]);
        })
    };
    // The matmul's own packing workspace is a fixed cost; what must not be there is a cost per
    // row of the size of the matrix.
    let (few, many) = (extra(16), extra(64));
    let per_row = 4 * (vocab + hidden);
    let matrix = 4 * vocab * hidden;
    eprintln!("lm_head peak: {few} B at 16 rows, {many} B at 64 rows; matrix {matrix} B, row {per_row} B");
    assert!(
        many <= few + 48 * 4 * per_row + matrix,
        "48 more rows took {} B more (matrix {matrix} B, row {per_row} B)",
        many.saturating_sub(few)
    );
}
