//! GStreamer plugin `vigil`: the element `vigilvlm`, which asks VideoLLaMA3 questions about
//! windows of a video stream on vigil's engine (the daemon's windows, processor, model and
//! batching) and posts each answer as a bus message and on a text pad. See `plugins/README.md`.

// vigil's errors carry their causes by value; built on cold paths only (see vigil's lib.rs).
#![allow(clippy::result_large_err)]

use gstreamer as gst;
use gstreamer::glib;

mod vigilvlm;

pub use vigilvlm::engines::models_loaded;
pub use vigilvlm::VigilVlm;

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    vigilvlm::register(plugin)
}

// GStreamer loads only plugins whose license is in its own short list, which has no entry for
// Apache-2.0 (the crate's license); "unknown" is that list's word for "another license".
gst::plugin_define!(
    vigil,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    env!("CARGO_PKG_VERSION"),
    "unknown",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    "https://github.com/vigil"
);
