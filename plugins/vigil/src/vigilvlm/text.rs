//! The `text` pad's own thread. Pushing a buffer may block in the peer (`textoverlay` holds each
//! text buffer until the video passes it), so neither the streaming thread nor the worker
//! pushes there: both queue items here, in order, and this thread pushes them. Serialized events
//! (stream-start, caps, segment, EOS) travel the same queue, so they keep their place among the
//! buffers; a flush empties the queue and is pushed at once (it unblocks the peer).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use gstreamer as gst;
use gstreamer::prelude::*;

use vigil::lock::{lock, wait, wait_timeout};

enum Item {
    Buffer(gst::Buffer),
    Event(gst::Event),
}

impl Item {
    /// Buffers and gaps may go when the peer falls behind; the other events must arrive.
    fn droppable(&self) -> bool {
        match self {
            Item::Buffer(_) => true,
            Item::Event(e) => e.type_() == gst::EventType::Gap,
        }
    }
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    stop: bool,
    /// The thread has left.
    done: bool,
}

struct Inner {
    queue: Mutex<Queue>,
    cv: Condvar,
}

/// Cheap to clone; the thread ends when [`TextOut::stop`] is called.
#[derive(Clone)]
pub struct TextOut {
    pad: gst::Pad,
    inner: Arc<Inner>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// Text items waiting at most; beyond it the oldest buffer goes (a peer that never takes text
/// must not make memory grow).
const MAX_ITEMS: usize = 256;

const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl TextOut {
    pub fn start(pad: gst::Pad, name: &str) -> std::io::Result<TextOut> {
        let inner = Arc::new(Inner { queue: Mutex::new(Queue::default()), cv: Condvar::new() });
        let (p, i) = (pad.clone(), inner.clone());
        let handle = std::thread::Builder::new().name(name.into()).spawn(move || run(&p, &i))?;
        Ok(TextOut { pad, inner, thread: Arc::new(Mutex::new(Some(handle))) })
    }

    pub fn is_linked(&self) -> bool {
        self.pad.is_linked()
    }

    pub fn buffer(&self, buf: gst::Buffer) {
        self.send(Item::Buffer(buf));
    }

    /// A serialized event, in order with the buffers.
    pub fn event(&self, ev: gst::Event) {
        self.send(Item::Event(ev));
    }

    fn send(&self, item: Item) {
        let mut q = lock(&self.inner.queue);
        if q.items.len() >= MAX_ITEMS {
            if let Some(i) = q.items.iter().position(Item::droppable) {
                q.items.remove(i);
            }
        }
        q.items.push_back(item);
        drop(q);
        self.inner.cv.notify_all();
    }

    /// Flush start: forget what is queued, and tell the peer now.
    pub fn flush_start(&self, ev: gst::Event) {
        lock(&self.inner.queue).items.retain(|i| !i.droppable());
        let _ = self.pad.push_event(ev);
    }

    /// End the thread. A push blocked in a peer that neither flushes nor stops is left to
    /// return on its own after `STOP_WAIT` (the thread ends then).
    pub fn stop(&self) {
        let mut q = lock(&self.inner.queue);
        q.stop = true;
        self.inner.cv.notify_all();
        let deadline = std::time::Instant::now() + STOP_WAIT;
        while !q.done {
            let now = std::time::Instant::now();
            if now >= deadline {
                return;
            }
            q = wait_timeout(&self.inner.cv, q, deadline - now);
        }
        drop(q);
        if let Some(h) = lock(&self.thread).take() {
            let _ = h.join();
        }
    }
}

fn run(pad: &gst::Pad, inner: &Inner) {
    push_all(pad, inner);
    lock(&inner.queue).done = true;
    inner.cv.notify_all();
}

fn push_all(pad: &gst::Pad, inner: &Inner) {
    loop {
        let item = {
            let mut q = lock(&inner.queue);
            loop {
                if q.stop {
                    return;
                }
                if let Some(i) = q.items.pop_front() {
                    break i;
                }
                q = wait(&inner.cv, q);
            }
        };
        // Not linked or flushing: the answers still went to the bus.
        match item {
            Item::Buffer(b) => {
                let _ = pad.push(b);
            }
            Item::Event(e) => {
                let _ = pad.push_event(e);
            }
        }
    }
}
