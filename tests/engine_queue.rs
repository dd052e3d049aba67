//! The engine thread as the daemon drives it: bounded queue under a flood, drops by age with
//! counters, fairness across streams, forget_stream, shutdown, heartbeat, load errors.

mod engine_util;

use std::time::{Duration, Instant};

use engine_util::*;
use vigil::engine::queue::DropReason;
use vigil::engine::{Engine, EngineError, JobOutput, RunError};

fn outputs_per_job(outs: &[JobOutput]) -> (usize, usize, Vec<DropReason>) {
    let (mut answered, mut dropped, mut reasons) = (0, 0, Vec::new());
    for o in outs {
        match o {
            JobOutput::Answer(_) => answered += 1,
            JobOutput::Dropped { reason, prompts, .. } => {
                assert_eq!(prompts.len(), 1);
                dropped += 1;
                reasons.push(*reason);
            }
            JobOutput::Failed { error, .. } => panic!("unexpected failure: {error}"),
        }
    }
    (answered, dropped, reasons)
}

#[test]
fn stale_jobs_are_dropped_by_age_and_fresh_ones_answered() {
    let cfg = config("max_new_tokens = 2", "max_queue_age_s = 1.0\nqueue_capacity = 64");
    let a = frames(0, 4, 64, 48, 2.0);
    let b = frames(1, 4, 48, 64, 1.0);
    let engine = start(&cfg);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (qtx, mut qrx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..10 {
        let mut j = job(&window("a", i, &a, 0, 4, 2.0), &cfg, &["person"], &tx);
        j.closed_at = Instant::now() - Duration::from_secs(5);
        engine.submit(j).unwrap();
    }
    for i in 0..2 {
        engine.submit(job(&window("b", i, &b, 0, 4, 1.0), &cfg, &["person"], &qtx)).unwrap();
    }
    let stale = collect(&mut rx, 10);
    let (answered, dropped, reasons) = outputs_per_job(&stale);
    assert_eq!((answered, dropped), (0, 10));
    assert!(reasons.iter().all(|r| *r == DropReason::TooOld), "{reasons:?}");
    let fresh = answers(collect(&mut qrx, 2));
    assert!(fresh.iter().all(|r| r.stream == "b"));
    let c = engine.counters();
    assert_eq!(c.jobs_dropped.get("too_old"), Some(&10));
    assert_eq!(c.jobs_queued, 12);
    assert_eq!(c.jobs_done, 2);
    assert!(engine.shutdown(Duration::from_secs(10)));
}

#[test]
fn a_flood_stays_bounded_and_another_stream_still_completes() {
    let cap = 4;
    let cfg = config("max_new_tokens = 4", &format!("queue_capacity = {cap}\nmax_batch = 2\nmax_queue_age_s = 600.0"));
    let a = frames(0, 8, 96, 64, 2.0);
    let b = frames(1, 4, 64, 96, 1.0);
    let engine = start(&cfg);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (qtx, mut qrx) = tokio::sync::mpsc::unbounded_channel();
    let flood = 300u64;
    // Camera "a" produces windows much faster than the engine answers them.
    let flooder = {
        let (engine, cfg, tx) = (engine.clone(), cfg.clone(), tx.clone());
        std::thread::spawn(move || {
            for i in 0..flood {
                engine.submit(job(&window("a", i, &a, (i % 4) as usize, 4, 2.0), &cfg, &["caption"], &tx)).unwrap();
                assert!(engine.queue_len() <= cap, "queue is bounded");
                if i % 10 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
    };
    // Camera "b" sends one window at a time, at its own pace: every one is answered although
    // the flood keeps the queue full.
    let quiet = 5u64;
    for i in 0..quiet {
        engine.submit(job(&window("b", i, &b, 0, 4, 1.0), &cfg, &["person"], &qtx)).unwrap();
        let r = answers(collect(&mut qrx, 1)).remove(0);
        assert_eq!((r.stream.as_str(), r.window_seq), ("b", i));
    }
    flooder.join().unwrap();
    // Every flood job gets exactly one output; the overflow was dropped and counted.
    let outs = collect(&mut rx, flood as usize);
    let (answered, dropped, reasons) = outputs_per_job(&outs);
    assert_eq!(answered + dropped, flood as usize);
    assert!(dropped > 0 && answered > 0, "answered {answered}, dropped {dropped}");
    assert!(reasons.iter().all(|r| *r == DropReason::QueueFull));
    let c = engine.counters();
    assert_eq!(c.jobs_dropped.get("queue_full").copied().unwrap_or(0), dropped as u64);
    assert_eq!(c.jobs_queued, flood + quiet);
    assert_eq!(c.jobs_done as usize, answered + quiet as usize);
    assert!(rx.try_recv().is_err(), "no job answered twice");
    assert!(engine.shutdown(Duration::from_secs(30)));
}

#[test]
fn forgetting_a_stream_drops_its_queued_jobs() {
    let cfg = config("max_new_tokens = 8", "queue_capacity = 64\nmax_batch = 1");
    let a = frames(0, 6, 96, 64, 2.0);
    let engine = start(&cfg);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..20 {
        engine.submit(job(&window("a", i, &a, 0, 6, 2.0), &cfg, &["caption"], &tx)).unwrap();
    }
    engine.forget_stream("a");
    assert_eq!(engine.queue_len(), 0);
    let outs = collect(&mut rx, 20);
    let (answered, dropped, reasons) = outputs_per_job(&outs);
    assert_eq!(answered + dropped, 20);
    assert!(reasons.iter().all(|r| *r == DropReason::StreamRemoved));
    assert_eq!(engine.counters().jobs_dropped.get("stream_removed").copied().unwrap_or(0), dropped as u64);
    assert!(engine.shutdown(Duration::from_secs(10)));
}

#[test]
fn shutdown_finishes_queued_work_then_refuses_jobs() {
    let cfg = config("max_new_tokens = 3", "max_batch = 2");
    let a = frames(0, 4, 64, 48, 2.0);
    let engine = start(&cfg);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..6 {
        engine.submit(job(&window("a", i, &a, 0, 4, 2.0), &cfg, &["person", "caption"], &tx)).unwrap();
    }
    assert!(engine.shutdown(Duration::from_secs(60)), "clean shutdown");
    let got = answers(collect(&mut rx, 12));
    assert_eq!(got.len(), 12);
    let err = engine.submit(job(&window("a", 9, &a, 0, 4, 2.0), &cfg, &["person"], &tx)).unwrap_err();
    assert!(matches!(err, EngineError::ShuttingDown | EngineError::Stopped), "{err}");
}

#[test]
fn heartbeat_stays_fresh_while_idle() {
    let engine = start(&config("", ""));
    std::thread::sleep(Duration::from_millis(1500));
    let age = engine.heartbeat_age();
    assert!(age < Duration::from_millis(900), "heartbeat {age:?} old");
    assert!(engine.shutdown(Duration::from_secs(5)));
}

#[test]
fn load_errors_come_back_as_errors() {
    let mut cfg = config("", "");
    cfg.model.path = Some("/nonexistent/vigil-model".into());
    let err = Engine::start(&cfg).err().expect("missing model");
    assert!(matches!(err, EngineError::Load(_)));
    assert!(err.to_string().contains("/nonexistent/vigil-model"), "{err}");
    // Weights without a tokenizer / processor files.
    cfg.model.path = Some(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/tiny_a"));
    let err = Engine::start(&cfg).err().expect("no processor files");
    assert!(matches!(err, EngineError::Load(_)), "{err}");
}

#[test]
fn bad_jobs_are_refused_or_fail_without_killing_the_engine() {
    let cfg = config("max_new_tokens = 2", "");
    let a = frames(0, 4, 64, 48, 2.0);
    let engine = start(&cfg);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut j = job(&window("a", 0, &a, 0, 4, 2.0), &cfg, &["person"], &tx);
    j.prompts.clear();
    assert!(matches!(engine.submit(j), Err(EngineError::InvalidJob(_))));
    // Frames of two sizes in one window: the processor refuses the video; the prompt fails.
    let mut mixed = a[..3].to_vec();
    mixed.extend(frames(1, 1, 48, 64, 2.0));
    engine.submit(job(&window("a", 1, &mixed, 0, 4, 2.0), &cfg, &["person"], &tx)).unwrap();
    match collect(&mut rx, 1).remove(0) {
        JobOutput::Failed { error, .. } => {
            assert!(matches!(*error, RunError::Processor(_)) && error.to_string().contains("same size"), "{error}")
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    // The engine still answers afterwards.
    engine.submit(job(&window("a", 2, &a, 0, 4, 2.0), &cfg, &["person"], &tx)).unwrap();
    answers(collect(&mut rx, 1));
    assert_eq!(engine.counters().prompts_failed, 1);
    assert!(engine.shutdown(Duration::from_secs(10)));
}

#[test]
fn shutdown_past_its_deadline_cuts_work_short_but_answers_every_prompt() {
    let cfg = config("max_new_tokens = 32", "max_batch = 2");
    let a = frames(0, 8, 160, 120, 2.0);
    let engine = start(&cfg);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..8 {
        engine.submit(job(&window("a", i, &a, 0, 8, 2.0), &cfg, &["caption", "person"], &tx)).unwrap();
    }
    assert!(!engine.shutdown(Duration::ZERO), "cannot finish 16 prompts in no time");
    // Every prompt still hears back exactly once: answered, failed (cut short) or dropped.
    let mut heard = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while heard < 16 {
        match rx.try_recv() {
            Ok(JobOutput::Dropped { reason, prompts, .. }) => {
                assert_eq!(reason, DropReason::Shutdown);
                heard += prompts.len();
            }
            Ok(JobOutput::Failed { error, .. }) => {
                assert!(matches!(*error, RunError::ShuttingDown), "{error}");
                heard += 1;
            }
            Ok(JobOutput::Answer(_)) => heard += 1,
            Err(_) => {
                assert!(Instant::now() < deadline, "only {heard} of 16 outputs");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(rx.try_recv().is_err(), "nothing answered twice");
    assert!(engine.counters().jobs_dropped.get("shutdown").copied().unwrap_or(0) > 0);
}

#[test]
fn handles_cross_threads() {
    fn send_sync<T: Send + Sync + Clone + 'static>() {}
    send_sync::<Engine>();
    fn send<T: Send + 'static>() {}
    send::<vigil::engine::Job>();
    send::<JobOutput>();
}
