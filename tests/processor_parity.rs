//! Parity of `vigil::processor` with transformers 5.24 on the committed fixtures
//! (`tests/reference/gen_processor_fixtures.py` wrote them; see tests/reference/README.md).

use std::path::{Path, PathBuf};

use serde_json::Value;
use vigil::config::PruningConfig;
use vigil::processor::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/processor")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("expected.json")).unwrap()).unwrap()
}

fn read_f32(entry: &Value) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(root().join("expected").join(entry["file"].as_str().unwrap())).unwrap();
    let v = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let shape = entry["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    (v, shape)
}

fn grids(v: &Value) -> Vec<[usize; 3]> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let g: Vec<usize> = g.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            [g[0], g[1], g[2]]
        })
        .collect()
}

fn bools(v: &Value) -> Vec<bool> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() == 1).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length differs");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn open(rel: &str) -> RgbImage {
    RgbImage::open(&root().join(rel)).unwrap()
}

fn check_images(backend: &str, ckpt: &str) {
    let exp = expected();
    let proc = ImageProcessor::from_pretrained(&root().join(ckpt)).unwrap();
    let mut worst = 0.0f32;
    for (name, case) in exp["images"].as_object().unwrap() {
        let img = open(case["file"].as_str().unwrap());
        let out = proc.preprocess(std::slice::from_ref(&img)).unwrap();
        let e = &case[backend];
        assert_eq!(out.image_grid_thw, grids(&e["image_grid_thw"]), "{backend} {name}: grid");
        let (want, shape) = read_f32(&e["pixel_values"]);
        assert_eq!(out.patch_dim, shape[1], "{backend} {name}: patch dim");
        let d = max_abs_diff(&out.pixel_values, &want);
        assert!(d <= 1e-6, "{backend} {name}: max |diff| = {d}");
        worst = worst.max(d);
    }
    eprintln!("{backend}: worst max |diff| over all images = {worst:e}");
}

#[test]
fn images_torchvision_backend_match_transformers() {
    check_images("torchvision", "ckpt_tf5");
}

#[test]
fn images_pil_backend_match_transformers() {
    let p = ImageProcessor::from_pretrained(&root().join("ckpt_pil")).unwrap();
    assert_eq!(p.config.backend, ResizeBackend::Pil);
    check_images("pil", "ckpt_pil");
}

#[test]
fn legacy_layout_reads_the_same_settings() {
    let a = CheckpointFiles::discover(&root().join("ckpt_tf5")).unwrap();
    let b = CheckpointFiles::discover(&root().join("ckpt_legacy")).unwrap();
    assert_eq!((a.image.min_pixels, a.image.max_pixels), (b.image.min_pixels, b.image.max_pixels));
    assert_eq!((a.video.base.min_pixels, a.video.base.max_pixels), (b.video.base.min_pixels, b.video.base.max_pixels));
    assert_eq!((a.image.merge_size, b.video.base.merge_size), (1, 2));
    assert!(a.chat_template_source.unwrap().ends_with("chat_template.jinja"));
    assert!(b.chat_template_source.unwrap().ends_with("chat_template.json"));
}

#[test]
fn videos_match_transformers_with_and_without_pruning() {
    let exp = expected();
    let proc = VideoProcessor::from_pretrained(&root().join("ckpt_tf5")).unwrap();
    for (name, case) in exp["videos"].as_object().unwrap() {
        let frames: Vec<RgbImage> =
            case["frames"].as_array().unwrap().iter().map(|p| open(p.as_str().unwrap())).collect();
        let video = Video::from_frames(frames, case["fps"].as_f64()).unwrap();
        let on = proc.preprocess(std::slice::from_ref(&video), &PruningConfig::default()).unwrap();
        let (want, _) = read_f32(&case["pixel_values_videos"]);
        let d = max_abs_diff(&on.pixel_values_videos, &want);
        assert!(d <= 1e-6, "{name}: max |diff| = {d}");
        assert_eq!(on.video_grid_thw, grids(&case["video_grid_thw"]), "{name}: grid");
        assert_eq!(on.video_compression_mask, bools(&case["compression_mask_pruned"]), "{name}: pruned mask");
        let off = proc.preprocess(&[video], &PruningConfig { enabled: false, ..Default::default() }).unwrap();
        assert_eq!(off.video_compression_mask, bools(&case["compression_mask_unpruned"]), "{name}: unpruned mask");
        assert_eq!(off.pixel_values_videos, on.pixel_values_videos);
    }
    // The moving clip must actually prune something and the static one more, or the test proves little.
    let kept = |k: &str| bools(&exp["videos"][k]["compression_mask_pruned"]).iter().filter(|b| **b).count();
    assert!(
        kept("static") < kept("moving")
            && kept("moving") < bools(&exp["videos"]["moving"]["compression_mask_pruned"]).len()
    );
}

#[test]
fn file_sampling_matches_transformers() {
    let exp = expected();
    let proc = VideoProcessor::from_pretrained(&root().join("ckpt_tf5")).unwrap();
    let file = root().join(exp["sampling_file"]["file"].as_str().unwrap());
    let decoded = vigil::processor::video_file::decode_video_file(&file).unwrap();
    assert_eq!(decoded.frames.len(), 12);
    assert_eq!(decoded.fps, 6.0);
    for (tag, case) in exp["sampling"].as_object().unwrap() {
        let kw = &case["kwargs"];
        let sampling = FrameSampling {
            fps: kw["fps"].as_f64(),
            num_frames: kw["num_frames"].as_u64().map(|n| n as usize),
            ..Default::default()
        };
        let video = Video::from_file(&file, &sampling, &proc.config).unwrap();
        let idx: Vec<usize> =
            case["indices"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(video.frame_indices, idx, "{tag}: indices");
        let ts: Vec<f64> = case["timestamps"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(video.timestamps, ts, "{tag}: timestamps");
        let out = proc.preprocess(&[video], &PruningConfig::default()).unwrap();
        let (want, _) = read_f32(&case["pixel_values_videos"]);
        let d = max_abs_diff(&out.pixel_values_videos, &want);
        assert!(d <= 1e-6, "{tag}: max |diff| = {d}");
        assert_eq!(out.video_grid_thw, grids(&case["video_grid_thw"]), "{tag}: grid");
        assert_eq!(out.video_compression_mask, bools(&case["compression_mask"]), "{tag}: mask");
    }
}

#[test]
fn tokenizer_matches_transformers() {
    let exp = expected();
    let p = Processor::from_pretrained(&root().join("ckpt_tf5")).unwrap();
    for (_, case) in exp["tokenizer"].as_object().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = p.tokenizer.encode(text, true).unwrap().get_ids().to_vec();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(p.decode(&ids, true).unwrap(), case["decoded_skip"].as_str().unwrap(), "{text:?} decode");
    }
}

#[test]
fn conversations_match_transformers_in_both_layouts() {
    let exp = expected();
    let mut procs = std::collections::HashMap::new();
    let mut checked = 0;
    for (key, case) in exp["conversations"].as_object().unwrap() {
        let layout = key.split('/').next().unwrap();
        let p = procs
            .entry(layout.to_string())
            .or_insert_with(|| Processor::from_pretrained(&root().join(format!("ckpt_{layout}"))).unwrap());
        let convs: Vec<Conversation> = serde_json::from_value(case["conversations"].clone()).unwrap();
        let prompts = p.apply_chat_template(&convs, true).unwrap();
        let want_prompts: Vec<String> = serde_json::from_value(case["prompts"].clone()).unwrap();
        assert_eq!(prompts, want_prompts, "{key}: prompts");
        let images: Vec<RgbImage> = case["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| open(&format!("media/{}.png", k.as_str().unwrap())))
            .collect();
        let videos: Vec<Video> = case["videos"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                let c = &exp["videos"][k.as_str().unwrap()];
                let frames = c["frames"].as_array().unwrap().iter().map(|p| open(p.as_str().unwrap())).collect();
                Video::from_frames(frames, c["fps"].as_f64()).unwrap()
            })
            .collect();
        let opts = CallOptions {
            padding_side: if case["padding_side"] == "left" { PaddingSide::Left } else { PaddingSide::Right },
            pruning: PruningConfig { enabled: case["use_token_compression"].as_bool().unwrap(), ..Default::default() },
        };
        let out = p.call(&prompts, &images, &videos, &opts).unwrap();
        let want_ids: Vec<Vec<u32>> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(out.input_ids, want_ids, "{key}: input_ids");
        let want_mask: Vec<Vec<u8>> = serde_json::from_value(case["attention_mask"].clone()).unwrap();
        assert_eq!(out.attention_mask, want_mask, "{key}: attention_mask");
        if !images.is_empty() {
            assert_eq!(out.images.image_grid_thw, grids(&case["image_grid_thw"]), "{key}: image grid");
            let want = case["pixel_values_sum"].as_f64().unwrap();
            let got: f64 = out.images.pixel_values.iter().map(|&v| v as f64).sum();
            assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{key}: pixel sum {got} vs {want}");
        }
        if !videos.is_empty() {
            assert_eq!(out.videos.video_grid_thw, grids(&case["video_grid_thw"]), "{key}: video grid");
            assert_eq!(out.videos.video_compression_mask, bools(&case["video_compression_mask"]), "{key}: mask");
            let want = case["pixel_values_videos_sum"].as_f64().unwrap();
            let got: f64 = out.videos.pixel_values_videos.iter().map(|&v| v as f64).sum();
            assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{key}: video pixel sum {got} vs {want}");
        }
        // Bookkeeping: every placeholder token belongs to the sample its media was assigned to.
        for (row, ids) in out.input_ids.iter().enumerate() {
            let n_img = ids.iter().filter(|&&t| t == out.image_token_id).count();
            let want_img: usize = out
                .image_sample
                .iter()
                .enumerate()
                .filter(|(_, &r)| r == row)
                .map(|(i, _)| {
                    let g = out.images.image_grid_thw[i];
                    g[0] * g[1] * g[2]
                })
                .sum();
            assert_eq!(n_img, want_img, "{key}: image tokens of row {row}");
        }
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} conversation cases");
}

#[test]
fn errors_are_clear() {
    let proc = ImageProcessor::from_pretrained(&root().join("ckpt_tf5")).unwrap();
    let e = proc.preprocess(&[open("media/bad_aspect.png")]).unwrap_err();
    assert!(matches!(e, ProcessorError::AspectRatio { .. }) && e.to_string().contains("aspect ratio"), "{e}");
    let e = proc.preprocess(&[RgbImage::new(0, 5, vec![]).unwrap()]).unwrap_err();
    assert!(matches!(e, ProcessorError::EmptyImage { .. }), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.png");
    let e = RgbImage::open(&missing).unwrap_err();
    assert!(e.to_string().contains("nope.png"), "{e}");
    let garbage = dir.path().join("garbage.png");
    std::fs::write(&garbage, b"this is not an image").unwrap();
    let e = RgbImage::open(&garbage).unwrap_err();
    assert!(e.to_string().contains("garbage.png"), "{e}");
    let e = vigil::processor::video_file::decode_video_file(&garbage).unwrap_err();
    assert!(e.to_string().contains("garbage.png"), "{e}");

    let vp = VideoProcessor::from_pretrained(&root().join("ckpt_tf5")).unwrap();
    let frames = vec![RgbImage::new(4, 4, vec![0; 48]).unwrap(), RgbImage::new(5, 4, vec![0; 60]).unwrap()];
    let e = vp.preprocess(&[Video::from_frames(frames, Some(1.0)).unwrap()], &PruningConfig::default()).unwrap_err();
    assert!(e.to_string().contains("same size"), "{e}");

    // Template missing: a copy of the tf5 checkpoint without chat_template.jinja.
    let ck = dir.path().join("ck");
    std::fs::create_dir(&ck).unwrap();
    for f in ["processor_config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(root().join("ckpt_tf5").join(f), ck.join(f)).unwrap();
    }
    let p = Processor::from_pretrained(&ck).unwrap();
    let e = p.apply_chat_template(&[vec![Message::system("hi")]], true).unwrap_err();
    assert!(matches!(e, ProcessorError::Template(_)) && e.to_string().contains("no chat template"), "{e}");

    // Malformed config names the file.
    std::fs::write(ck.join("processor_config.json"), "{ not json").unwrap();
    let e = Processor::from_pretrained(&ck).unwrap_err();
    assert!(e.to_string().contains("processor_config.json"), "{e}");
    std::fs::write(ck.join("processor_config.json"), r#"{"image_processor": {"patch_size": "big"}}"#).unwrap();
    let e = Processor::from_pretrained(&ck).unwrap_err();
    assert!(e.to_string().contains("image_processor.patch_size"), "{e}");

    // Placeholder / media count mismatch.
    let p = Processor::from_pretrained(&root().join("ckpt_tf5")).unwrap();
    let e = p.call(&["<|image_pad|>".to_string()], &[], &[], &CallOptions::default()).unwrap_err();
    assert!(e.to_string().contains("1 <|image_pad|> placeholders but 0 images"), "{e}");
}

#[test]
fn chat_templates_render_like_transformers_jinja() {
    let exp = expected();
    for case in exp["templates"].as_array().unwrap() {
        let t = ChatTemplate::new(case["template"].as_str().unwrap().to_string()).unwrap();
        for (i, conv) in case["conversations"].as_array().unwrap().iter().enumerate() {
            let mut ctx = case["kwargs"].as_object().unwrap().clone();
            ctx.insert("messages".into(), conv.clone());
            ctx.insert("add_generation_prompt".into(), case["add_generation_prompt"].clone());
            let got = t.render_context(&ctx).unwrap();
            assert_eq!(got, case["rendered"][i].as_str().unwrap(), "template {} conversation {i}", case["name"]);
        }
    }
}

#[test]
fn pruning_threshold_and_min_tokens_match_transformers() {
    let exp = expected();
    let proc = VideoProcessor::from_pretrained(&root().join("ckpt_tf5")).unwrap();
    let mut distinct = std::collections::HashSet::new();
    for case in exp["pruning_params"].as_array().unwrap() {
        let c = &exp["videos"][case["clip"].as_str().unwrap()];
        let frames = c["frames"].as_array().unwrap().iter().map(|p| open(p.as_str().unwrap())).collect();
        let video = Video::from_frames(frames, c["fps"].as_f64()).unwrap();
        let cfg = PruningConfig {
            enabled: true,
            threshold: case["threshold"].as_f64().unwrap(),
            min_tokens_per_frame: case["min_tokens"].as_u64().unwrap() as usize,
        };
        let out = proc.preprocess(&[video], &cfg).unwrap();
        let want = bools(&case["mask"]);
        assert_eq!(out.video_compression_mask, want, "{case}");
        distinct.insert(want);
    }
    assert!(distinct.len() >= 8, "fixture masks are too uniform to prove anything");
}

#[test]
fn system_prompt_switch_of_the_real_template() {
    let exp = expected();
    let case = exp["templates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "real_system" && c["add_generation_prompt"] == true)
        .unwrap();
    let p = Processor::from_pretrained(&root().join("ckpt_tf5")).unwrap();
    let convs: Vec<Conversation> = serde_json::from_value(case["conversations"].clone()).unwrap();
    let mut extra = serde_json::Map::new();
    extra.insert("add_system_prompt".into(), true.into());
    let got = p.apply_chat_template_with(&convs, true, &extra).unwrap();
    assert_eq!(got[0], case["rendered"][0].as_str().unwrap());
}

/// The Python generator's `formula_image`.
fn formula_image(h: usize, w: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                v.push(((x * 7 + y * 13 + c * 50 + (x * y) % 17 * 9) % 256) as u8);
            }
        }
    }
    v
}

#[test]
fn resize_kernels_are_bit_exact_at_large_scale_factors() {
    use vigil::processor::resize::{resize_pil_bicubic, resize_torchvision_bicubic_u8};
    let exp = expected();
    for case in exp["resize"].as_array().unwrap() {
        let hw = |k: &str| (case[k][0].as_u64().unwrap() as usize, case[k][1].as_u64().unwrap() as usize);
        let ((h, w), (oh, ow)) = (hw("in_hw"), hw("out_hw"));
        let src = formula_image(h, w);
        for (tag, got) in [
            ("torchvision", resize_torchvision_bicubic_u8(&src, h, w, 3, oh, ow)),
            ("pil", resize_pil_bicubic(&src, h, w, 3, oh, ow)),
        ] {
            let want = RgbImage::open(&root().join("expected").join(case[tag].as_str().unwrap())).unwrap();
            assert_eq!((want.height, want.width), (oh, ow));
            let bad = got.iter().zip(&want.data).filter(|(a, b)| a != b).count();
            assert_eq!(bad, 0, "{tag} {h}x{w} -> {oh}x{ow}: {bad} of {} values differ", got.len());
        }
    }
}
