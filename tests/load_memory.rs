//! Loading a checkpoint holds one copy of the weights at its peak, not two (the file's pages
//! plus the converted tensors, as a memory-mapped load does): measured as the growth of the
//! process's peak RSS while a real checkpoint loads.

use candle_core::{DType, Device};
use vigil::model::VideoLlama3ForConditionalGeneration;

extern "C" {
    /// glibc: give free heap memory back to the system.
    fn malloc_trim(pad: usize) -> i32;
}

fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

#[test]
fn loading_holds_one_copy_of_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cfg =
        vigil::bench::random::bench_config(root.join("tests/fixtures/infer/ckpt_tf5/config.json").to_str().unwrap())
            .unwrap();
    // Big enough that the weights dwarf the allocator's noise (~80 MB in f32).
    let t = &mut cfg["text_config"];
    t["hidden_size"] = 256.into();
    t["intermediate_size"] = 4096.into();
    t["num_hidden_layers"] = 6.into();
    let info = vigil::bench::random::write_random_checkpoint(dir.path(), &cfg, DType::F32, 1).unwrap();
    let weights_kb = info.parameters * 4 / 1024;

    // Writing the checkpoint freed ~weights of heap that the allocator may keep resident and
    // hand to the load, hiding it from the peak: return it first. Then reset the peak to what
    // is resident now, and load.
    unsafe { malloc_trim(0) };
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_kb("VmHWM:");
    let model = VideoLlama3ForConditionalGeneration::from_pretrained(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let grew = status_kb("VmHWM:") - before;
    drop(model);
    eprintln!("weights {weights_kb} kB; peak RSS grew {grew} kB while loading");
    assert!(grew < weights_kb * 3 / 2, "loading grew the peak by {grew} kB for {weights_kb} kB of weights");
    assert!(grew > weights_kb / 2, "the measurement missed the weights: {grew} kB for {weights_kb} kB");
}
