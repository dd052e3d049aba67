//! Exactness of the engine's optimisations on the committed tiny checkpoint (CPU): with the
//! per-frame feature cache, the shared video prefix and cross-stream batches all on, every answer
//! is token-for-token the one of running that (window, prompt) alone through the processor and
//! `generate` (`Runner::run_alone`, what one `vigil infer --frames ... --fps F` request computes).

mod engine_util;

use std::sync::Arc;

use engine_util::*;
use vigil::config::Config;
use vigil::engine::runner::RunOptions;
use vigil::engine::{Engine, PromptResult};
use vigil::window::Window;

/// Overlapping windows from two streams with different frame sizes and rates.
fn workload() -> Workload {
    let a = frames(0, 10, 160, 120, 2.0);
    let b = frames(1, 8, 96, 128, 1.0);
    vec![
        (window("a", 0, &a, 0, 6, 2.0), vec!["caption", "person", "count"]),
        (window("b", 0, &b, 0, 4, 1.0), vec!["caption", "person"]),
        (window("a", 1, &a, 2, 6, 2.0), vec!["caption", "person", "count"]),
        (window("b", 1, &b, 2, 4, 1.0), vec!["count"]),
        (window("a", 2, &a, 4, 6, 2.0), vec!["person", "caption"]),
        (window("b", 2, &b, 4, 4, 1.0), vec!["caption", "person", "count"]),
    ]
}

fn run_engine(cfg: &Config, work: &[(Arc<Window>, Vec<&str>)]) -> (Vec<PromptResult>, vigil::engine::EngineCounters) {
    let engine = start(cfg);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut n = 0;
    for (w, names) in work {
        engine.submit(job(w, cfg, names, &tx)).unwrap();
        n += names.len();
    }
    let got = answers(collect(&mut rx, n));
    let c = engine.counters();
    assert!(engine.shutdown(std::time::Duration::from_secs(30)));
    (got, c)
}

#[test]
fn optimised_answers_equal_each_request_alone() {
    let cfg = config("", "max_batch = 16\nfeature_cache_frames = 64");
    let work = workload();
    let (got, c) = run_engine(&cfg, &work);
    assert_same_as_alone(&cfg, &work, &got);
    // Pruning is exercised: the moving square keeps some tokens, the static background not.
    assert!(got.iter().any(|r| r.visual_kept < r.visual_total));
    // Every frame encoded once: stream a has 10 distinct frames in 18 window slots, b 8 in 12.
    assert_eq!((c.vision_cache_misses, c.vision_cache_hits), (18, 12));
    assert_eq!(c.frames_encoded, 18);
    // Resizing + normalizing is cached the same way.
    assert_eq!((c.pixel_cache_misses, c.pixel_cache_hits), (18, 12));
    // One video prefill per window; every further prompt of a window re-used it.
    assert_eq!(c.video_prefills, 6);
    assert_eq!(c.prefix_shared, (3 + 2 + 3 + 1 + 2 + 3) - 6);
    assert_eq!(c.prefix_fallbacks, 0);
    assert_eq!(c.jobs_done, 6);
    assert_eq!(c.prompts_done, 14);
    assert!(c.batches >= 1 && c.batch_size_sum == 14);
    assert_eq!(c.tokens_generated, got.iter().map(|r| r.generated_tokens as u64).sum::<u64>());
}

#[test]
fn batched_sampling_keeps_each_rows_own_rng() {
    // Sampling: each row must draw from its own seeded RNG, as it would alone.
    let cfg = config("temperature = 0.9\ntop_k = 40\ntop_p = 0.95\nseed = 11", "max_batch = 16");
    let work = workload();
    let (got, _) = run_engine(&cfg, &work);
    assert_same_as_alone(&cfg, &work, &got);
}

#[test]
fn optimisations_off_agree_too() {
    // The batched path without cache and sharing (still batched across streams).
    let cfg = config("", "max_batch = 4");
    let work = workload();
    let engine = Engine::start_with(&cfg, RunOptions { feature_cache: false, share_prefix: false }).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (w, names) in &work {
        engine.submit(job(w, &cfg, names, &tx)).unwrap();
    }
    let got = answers(collect(&mut rx, 14));
    let c = engine.counters();
    assert!(engine.shutdown(std::time::Duration::from_secs(30)));
    assert_same_as_alone(&cfg, &work, &got);
    assert_eq!(c.vision_cache_hits, 0);
    assert_eq!(c.pixel_cache_hits + c.pixel_cache_misses, 0, "the processor ran per window");
    assert_eq!(c.frames_encoded, 6 * 3 + 4 * 3);
    assert_eq!(c.video_prefills, 14, "one prefill per prompt without sharing");
    assert_eq!(c.prefix_shared, 0);
}

#[test]
fn two_prompts_prefill_the_video_once() {
    let cfg = config("", "");
    let a = frames(0, 6, 160, 120, 2.0);
    let w = window("a", 0, &a, 0, 6, 2.0);
    let engine = start(&cfg);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    engine.submit(job(&w, &cfg, &["caption", "person"], &tx)).unwrap();
    let got = answers(collect(&mut rx, 2));
    let c = engine.counters();
    engine.shutdown(std::time::Duration::from_secs(10));
    assert_eq!(c.video_prefills, 1);
    assert_eq!(c.prefix_shared, 1);
    // The prefix (template head + video) is prefilled once; per prompt only its question and
    // the generation prompt are prefilled.
    let prefix = c.prefix_tokens;
    assert!(prefix >= got[0].visual_kept as u64 && prefix < got[0].prompt_tokens as u64);
    let questions: u64 = got.iter().map(|r| r.prompt_tokens as u64 - prefix).sum();
    assert_eq!(c.suffix_tokens, questions);
    assert!(questions < prefix, "questions ({questions}) are the small part here; prefix {prefix}");

    // Without sharing the video is prefilled for each prompt.
    let engine = Engine::start_with(&cfg, RunOptions { feature_cache: true, share_prefix: false }).unwrap();
    engine.submit(job(&w, &cfg, &["caption", "person"], &tx)).unwrap();
    let again = answers(collect(&mut rx, 2));
    let c = engine.counters();
    engine.shutdown(std::time::Duration::from_secs(10));
    assert_eq!(c.video_prefills, 2);
    assert_eq!(c.prefix_shared, 0);
    assert_eq!(c.prefix_tokens + c.suffix_tokens, got.iter().map(|r| r.prompt_tokens as u64).sum::<u64>());
    for (x, y) in got.iter().zip(&again) {
        assert_eq!(x.tokens, y.tokens);
    }
}

#[test]
fn cache_hits_count_reused_frames_and_a_size_change_misses() {
    let cfg = config("", "feature_cache_frames = 64");
    let a = frames(0, 8, 160, 120, 2.0);
    let engine = start(&cfg);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let step = |w: Arc<Window>, rx: &mut tokio::sync::mpsc::UnboundedReceiver<_>| {
        engine.submit(job(&w, &cfg, &["person"], &tx)).unwrap();
        let r = answers(collect(rx, 1)).remove(0);
        let c = engine.counters();
        (r, (c.vision_cache_hits, c.vision_cache_misses))
    };
    let (r1, c1) = step(window("a", 0, &a, 0, 6, 2.0), &mut rx);
    assert_eq!(c1, (0, 6));
    // Overlap of 4 frames with the first window.
    let (r2, c2) = step(window("a", 1, &a, 2, 6, 2.0), &mut rx);
    assert_eq!(c2, (4, 8));
    assert_eq!(r1.visual_total, r2.visual_total);
    // Same pixels in new allocations: content keys, not pointers, so these hit.
    let copies: Vec<_> = a.iter().map(|f| Arc::new((**f).clone())).collect();
    let (_, c3) = step(window("a", 2, &copies, 2, 6, 2.0), &mut rx);
    assert_eq!(c3, (10, 8));
    // Four of the same frames in a 4-frame window: the per-frame pixel budget grows, the frames
    // are resized to a different grid, so they must miss.
    let (r4, c4) = step(window("a", 3, &a, 2, 4, 2.0), &mut rx);
    assert_eq!(c4, (10, 12));
    assert_ne!(r4.visual_total / 4, r1.visual_total / 6, "the resized size changed");
    assert!(engine.shutdown(std::time::Duration::from_secs(10)));
}

#[test]
fn short_and_odd_windows_are_exact_too() {
    // A partial final window (3 frames) and a single-frame window next to full ones.
    let cfg = config("", "max_batch = 16");
    let a = frames(0, 9, 160, 120, 2.0);
    let b = frames(1, 5, 96, 128, 1.0);
    let work = vec![
        (window("a", 0, &a, 0, 6, 2.0), vec!["caption", "person"]),
        (window("a", 1, &a, 6, 3, 2.0), vec!["caption", "count"]),
        (window("b", 0, &b, 0, 1, 1.0), vec!["person", "caption"]),
        (window("b", 1, &b, 0, 5, 1.0), vec!["caption"]),
    ];
    let (got, c) = run_engine(&cfg, &work);
    assert_same_as_alone(&cfg, &work, &got);
    assert_eq!(c.video_prefills, 4);
}

/// One batch of windows whose video prefixes differ in length (two streams, two frame sizes):
/// the prefixes are prefilled packed, the padding a left-padded batch would have computed is
/// skipped (counted), and every answer is still the one of its request alone.
#[test]
fn unequal_prefixes_are_packed_and_exact() {
    let cfg = config("", "max_batch = 16");
    let (work, got, stats) = unequal_batch(&cfg);
    assert_eq!(stats.video_prefills, 2);
    // The same question follows each video, so the two prefixes differ by what the caption
    // prompts' lengths differ by; the longer one sets the padded length.
    assert_eq!((&got[0].prompt, &got[3].prompt), (&"caption".to_string(), &"caption".to_string()));
    let differ = (got[0].prompt_tokens as i64 - got[3].prompt_tokens as i64).unsigned_abs();
    assert!(differ > 0, "the two prefixes differ in length");
    assert_eq!(stats.prefix_padding_skipped, differ);
    assert_same_as_alone(&cfg, &work, &got);
}
