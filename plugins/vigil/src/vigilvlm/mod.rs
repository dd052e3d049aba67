//! `vigilvlm`: an in-place passthrough filter on raw video that samples frames at `fps`, builds
//! windows of them (`window-seconds`, `stride-seconds`) and asks VideoLLaMA3 its prompts about
//! each window on a shared engine thread. Video buffers are never held back for inference.
//!
//! Each (window, prompt) answer is posted as an element message named `vigilvlm-answer` and
//! pushed on the always `text` source pad (`text/x-raw, format=utf8`), timestamped with the
//! window's span. When the engine falls behind, the oldest waiting windows are dropped and
//! counted (`windows-dropped`, a `vigilvlm-dropped` message each). At EOS the answers of the
//! pending windows are posted before EOS travels on (at most `eos-timeout` seconds).

use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;

pub mod engines;
mod imp;
mod sampler;
mod text;
mod worker;

glib::wrapper! {
    pub struct VigilVlm(ObjectSubclass<imp::VigilVlm>) @extends gstreamer_base::BaseTransform, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(Some(plugin), "vigilvlm", gst::Rank::NONE, VigilVlm::static_type())
}
