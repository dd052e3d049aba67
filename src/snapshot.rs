//! Snapshots: a JPEG of a window's key frame, published with the answers of prompts that ask for
//! one (`[[prompt]] snapshot = true`) so that a notification can carry a picture.
//!
//! The key frame is the one that changed most: the most video tokens kept by the pruning
//! measure against the frame before ([`key_frame_by_changes`]), else the last (where something
//! happened). Without the measure, the frame whose RGB bytes differ most from the one before
//! ([`key_frame`]). Frames are as the window buffered them; `snapshot_max_pixels` scales larger
//! ones down, aspect kept.

use std::path::Path;

use crate::window::Frame;

/// The index of the frame with the most changed tokens (`changes`, per frame), else the last.
pub fn key_frame_by_changes(changes: &[usize]) -> Option<usize> {
    let last = changes.len().checked_sub(1)?;
    let (best, most) =
        changes.iter().enumerate().fold((last, 0), |(bi, bc), (i, &c)| if c > bc { (i, c) } else { (bi, bc) });
    Some(if most > 0 { best } else { last })
}

/// The frame of a window whose bytes differ most from the frame before, else the last.
pub fn key_frame<F: std::ops::Deref<Target = Frame>>(frames: &[F]) -> Option<&Frame> {
    let last = frames.last()?;
    let mut best: Option<(u64, &Frame)> = None;
    for pair in frames.windows(2) {
        let (a, b) = (&*pair[0], &*pair[1]);
        if a.data.len() != b.data.len() {
            continue;
        }
        let diff: u64 = a.data.iter().zip(&b.data).map(|(x, y)| x.abs_diff(*y) as u64).sum();
        if diff > 0 && best.is_none_or(|(d, _)| diff > d) {
            best = Some((diff, b));
        }
    }
    Some(best.map(|(_, f)| f).unwrap_or(last))
}

/// A JPEG of `frame` at `quality` (1-100), at most `max_pixels` (scaled down, aspect kept).
/// Returns the bytes and the picture's width and height.
pub fn encode_jpeg(frame: &Frame, quality: u8, max_pixels: Option<u64>) -> Result<(Vec<u8>, u32, u32), String> {
    let (mut w, mut h, mut data) = (frame.width, frame.height, std::borrow::Cow::Borrowed(&frame.data));
    if let Some(max) = max_pixels.filter(|m| (w as u64) * (h as u64) > *m) {
        let (tw, th) = crate::source::fit_size(w, h, (1, 1), max);
        let scaled = crate::processor::resize::resize_torchvision_bicubic_u8(
            &data,
            h as usize,
            w as usize,
            3,
            th as usize,
            tw as usize,
        );
        (w, h, data) = (tw, th, std::borrow::Cow::Owned(scaled));
    }
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100))
        .encode(&data, w, h, image::ExtendedColorType::Rgb8)
        .map_err(|e| format!("JPEG encoding failed: {e}"))?;
    Ok((out, w, h))
}

/// Write `<name>.jpg` into `dir`, then delete the oldest `.jpg` files beyond `keep`.
pub fn save(dir: &Path, name: &str, jpeg: &[u8], keep: usize) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // An answer id holds the stream and prompt names (letters, digits, '-', '_', '.') and ':'.
    let file = dir.join(format!("{}.jpg", name.replace(['/', '\\'], "_")));
    std::fs::write(&file, jpeg)?;
    let mut files: Vec<(std::time::SystemTime, std::path::PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    if files.len() > keep {
        files.sort();
        for (_, p) in &files[..files.len() - keep] {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(level: u8, w: u32, h: u32) -> Frame {
        Frame {
            width: w,
            height: h,
            data: vec![level; (w * h * 3) as usize],
            slot: 0,
            time_s: 0.0,
            captured_at: std::time::SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn the_key_frame_is_where_most_changed_else_the_last() {
        let frames = [frame(10, 4, 4), frame(12, 4, 4), frame(90, 4, 4), frame(91, 4, 4)];
        assert_eq!(key_frame(&frames.iter().collect::<Vec<_>>()).unwrap().data[0], 90);
        let frozen = [frame(7, 4, 4), frame(7, 4, 4)];
        assert!(std::ptr::eq(key_frame(&frozen.iter().collect::<Vec<_>>()).unwrap(), &frozen[1]));
        assert!(key_frame::<&Frame>(&[]).is_none());
    }

    #[test]
    fn the_key_frame_by_the_pruning_measure() {
        assert_eq!(key_frame_by_changes(&[0, 2, 9, 1]), Some(2));
        assert_eq!(key_frame_by_changes(&[0, 0, 0]), Some(2), "frozen: the last");
        assert_eq!(key_frame_by_changes(&[]), None);
    }

    #[test]
    fn jpegs_decode_at_the_frame_size_or_the_cap() {
        let f = frame(128, 64, 48);
        let (jpeg, w, h) = encode_jpeg(&f, 80, None).unwrap();
        let img = image::load_from_memory(&jpeg).unwrap();
        assert_eq!((img.width(), img.height(), w, h), (64, 48, 64, 48));
        let (jpeg, w, h) = encode_jpeg(&f, 80, Some(16 * 12)).unwrap();
        let img = image::load_from_memory(&jpeg).unwrap();
        assert_eq!((img.width(), img.height()), (w, h));
        assert!(w * h <= 16 * 12 && w > h, "{w}x{h}");
    }

    #[test]
    fn the_directory_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5 {
            save(dir.path(), &format!("cam:{i}:person"), b"jpeg", 2).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["cam:3:person.jpg", "cam:4:person.jpg"]);
    }
}
