//! What `vigil check` verifies of the model a config names, short of loading the weights' data:
//! the device, `config.json`, every tensor's name and shape in the safetensors headers, the
//! processor files, the tokenizer and the chat template; then that the largest request of each
//! stream (its longest window at its largest frames, with each of its prompts and the answer)
//! fits the model's context. What `run` would stumble on at load time, `check` reports first.

use std::path::PathBuf;

use crate::config::{Config, PromptConfig, StreamConfig};
use crate::model::ModelError;
use crate::processor::resize::smart_resize;
use crate::processor::template::{ContentPart, Message};
use crate::processor::{Processor, ProcessorError};

/// Why the model a config names would not run.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("model.device: {0}")]
    Device(#[source] ModelError),
    #[error("model directory: {0}")]
    Dir(#[source] ModelError),
    #[error("{}: {source}", dir.display())]
    Model {
        dir: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error("{source}")]
    Processor {
        #[source]
        source: ProcessorError,
    },
    #[error("prompt {prompt:?}: {message}")]
    Prompt { prompt: String, message: String },
    #[error(
        "stream {stream:?}, prompt {prompt:?}: a request takes up to {} tokens ({frames} frames × {per_frame} \
         + {text} text + {answer} answer), beyond the model's context of {context}; use fewer frames \
         (fps, window_seconds), fewer pixels (max_frame_pixels) or a shorter answer (max_new_tokens)",
        .frames * .per_frame + .text + .answer
    )]
    TooLong {
        stream: String,
        prompt: String,
        frames: usize,
        per_frame: usize,
        text: usize,
        answer: usize,
        context: usize,
    },
}

/// What was checked, for `check`'s summary.
#[derive(Debug, Clone)]
pub struct Preflight {
    pub dir: PathBuf,
    /// The model's context, if its config states one.
    pub context: Option<usize>,
    /// The largest request over all streams and prompts: (stream, prompt, tokens).
    pub largest: Option<(String, String, usize)>,
}

/// Check the model `cfg` names (a `repo` must already be in the Hugging Face cache). Every
/// problem found is returned, not just the first.
pub fn preflight(cfg: &Config) -> Result<Preflight, Vec<PreflightError>> {
    let device = crate::model::load::candle_device(cfg.model.device);
    let mut problems: Vec<PreflightError> = device.err().map(PreflightError::Device).into_iter().collect();
    let dir = match crate::model::load::model_dir(&cfg.model, &cfg.base_dir) {
        Ok(d) => d,
        Err(e) => {
            problems.push(PreflightError::Dir(e));
            return Err(problems);
        }
    };
    let model =
        crate::model::load::check_pretrained(&dir).map_err(|source| PreflightError::Model { dir: dir.clone(), source });
    let processor = Processor::from_pretrained(&dir).map_err(|source| PreflightError::Processor { source });
    let (model, processor) = match (model, processor) {
        (Ok(m), Ok(p)) => (m, p),
        (m, p) => {
            problems.extend(m.err());
            problems.extend(p.err());
            return Err(problems);
        }
    };
    let context = model.text_config.max_position_embeddings;
    let (fit, largest) = context_fit(cfg, &processor, context);
    problems.extend(fit);
    if problems.is_empty() {
        Ok(Preflight { dir, context, largest })
    } else {
        Err(problems)
    }
}

/// Whether the largest request of every (enabled stream, prompt) fits `context`: the problems,
/// and the largest request (stream, prompt, tokens). `run` checks this too, once the model is
/// loaded, so a config that skipped `check` cannot run out of memory on it.
pub fn context_fit(
    cfg: &Config,
    processor: &Processor,
    context: Option<usize>,
) -> (Vec<PreflightError>, Option<(String, String, usize)>) {
    let mut problems = Vec::new();
    let mut largest: Option<(String, String, usize)> = None;
    for s in cfg.streams.iter().filter(|s| s.enabled) {
        for p in s.prompts.iter().filter_map(|name| cfg.prompt(name)) {
            match request_tokens(cfg, processor, s, p) {
                Err(e) => problems.push(e),
                Ok(r) => {
                    let total = r.total();
                    if let Some(context) = context.filter(|c| total > *c) {
                        problems.push(PreflightError::TooLong {
                            stream: s.name.clone(),
                            prompt: p.name.clone(),
                            frames: r.frames,
                            per_frame: r.per_frame,
                            text: r.text,
                            answer: r.answer,
                            context,
                        });
                    }
                    if largest.as_ref().is_none_or(|(_, _, t)| total > *t) {
                        largest = Some((s.name.clone(), p.name.clone(), total));
                    }
                }
            }
        }
    }
    (problems, largest)
}

/// The largest request of one (stream, prompt), in tokens, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RequestTokens {
    frames: usize,
    /// Visual tokens plus the frame's `Time t s:` label, at the most.
    per_frame: usize,
    /// The rendered conversation without the video.
    text: usize,
    answer: usize,
}

impl RequestTokens {
    fn total(&self) -> usize {
        self.frames * self.per_frame + self.text + self.answer
    }
}

/// The longest window at `max_frame_pixels`, unpruned (pruning can keep every token), over the
/// common aspect ratios; the question in the checkpoint's chat template; the longest answer.
fn request_tokens(
    cfg: &Config,
    processor: &Processor,
    s: &StreamConfig,
    p: &PromptConfig,
) -> Result<RequestTokens, PreflightError> {
    let prompt_err = |message: String| PreflightError::Prompt { prompt: p.name.clone(), message };
    let st = &s.settings;
    let frames = ((st.window_seconds * st.fps) + 1e-9).floor().max(1.0) as usize;
    let c = &processor.files.video.base;
    let visual = [(1.0, 1.0), (4.0, 3.0), (16.0, 9.0), (21.0, 9.0)]
        .iter()
        .map(|(a, b)| {
            // Frames reach the model at the processor's size for the window, whatever their
            // native size: the largest is a frame at the per-frame budget.
            let px = (st.max_frame_pixels as f64).max((c.max_pixels / frames) as f64);
            let h = (px * b / a).sqrt().floor().max(1.0) as usize;
            let w = (px / h as f64).floor().max(1.0) as usize;
            let (h, w) = if c.do_resize {
                smart_resize(h, w, c.patch_size * c.merge_size, c.min_pixels, c.max_pixels / frames)
                    .map_err(|source| PreflightError::Processor { source })?
            } else {
                (h, w)
            };
            let gt = frames.div_ceil(c.temporal_patch_size.max(1));
            let merged = (c.merge_size * c.merge_size).max(1);
            Ok((gt * (h / c.patch_size) * (w / c.patch_size) / merged).div_ceil(frames))
        })
        .collect::<Result<Vec<usize>, PreflightError>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    let conv = vec![Message::user(vec![ContentPart::Video, ContentPart::Text { text: p.text.clone() }])];
    let rendered =
        processor.apply_chat_template(&[conv], true).map_err(|e| prompt_err(format!("chat template: {e}")))?.remove(0);
    let encode =
        |s: &str| processor.tokenizer.encode(s, true).map(|e| e.get_ids().len()).map_err(|e| prompt_err(e.to_string()));
    let vtok = &processor.files.video_token;
    if rendered.matches(vtok.as_str()).count() != 1 {
        return Err(prompt_err(format!("the rendered conversation must hold exactly one {vtok}")));
    }
    let text = encode(&rendered)?.saturating_sub(1);
    let label = encode(&format!("Time {:.1}s:,", st.window_seconds.max(1000.0)))?;
    let answer = p.max_new_tokens.unwrap_or(cfg.model.max_new_tokens);
    Ok(RequestTokens { frames, per_frame: visual + label, text, answer })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(max_new_tokens: usize, extra_defaults: &str, prompt: &str) -> Config {
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-videollama3");
        let text = format!(
            "[model]\npath = {model:?}\ndevice = \"cpu\"\ndtype = \"f32\"\nmax_new_tokens = {max_new_tokens}\n\n\
             [defaults]\n{extra_defaults}\n\n[[prompt]]\nname = \"q\"\ntext = {prompt:?}\n\n\
             [[stream]]\nname = \"cam\"\nuri = \"rtsp://cam.local/s\"\nprompts = [\"q\"]\n"
        );
        Config::parse(&text, "t.toml", std::path::Path::new(".")).unwrap()
    }

    #[test]
    fn the_shipped_model_passes_and_its_largest_request_is_counted() {
        let cfg = shipped(8, "fps = 1.0\nwindow_seconds = 4.0\nmax_frame_pixels = 12544", "What happens?");
        let p = preflight(&cfg).unwrap();
        assert_eq!(p.context, Some(32768));
        let (stream, prompt, tokens) = p.largest.unwrap();
        assert_eq!((stream.as_str(), prompt.as_str()), ("cam", "q"));
        // 4 frames at most at the processor's per-frame budget (a quarter of the clip's, 224 × 224
        // px), plus labels, text and the answer: 4 × (64 + ~10) + ~40.
        assert!((300..400).contains(&tokens), "{tokens}");
    }

    #[test]
    fn a_window_beyond_the_context_is_refused_with_its_arithmetic() {
        // The processor shares a pixel budget among a clip's frames, so 180 large frames stay in
        // bounds here; an answer of 40 000 tokens does not.
        let cfg = shipped(40_000, "fps = 30.0\nwindow_seconds = 6.0\nmax_frame_pixels = 1000000", "What happens?");
        let e = preflight(&cfg).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        let msg = e[0].to_string();
        assert!(msg.contains("stream \"cam\"") && msg.contains("180 frames") && msg.contains("40000 answer"), "{msg}");
        assert!(msg.contains("context of 32768"), "{msg}");
    }
}
