//! MQTT topic layout (the table is also in README "MQTT").
//!
//! Stream and prompt names are validated by `config` to `[A-Za-z0-9._-]`, so they are always a
//! single, wildcard-free topic level.

/// Builds every topic under `mqtt.topic_prefix`.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

/// What a `.../set` command addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetTarget {
    Stream(String),
    Prompt { stream: String, prompt: String },
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Topics { prefix: prefix.to_string() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/available`: `online` / `offline` (last will) / `stopped`, retained.
    pub fn available(&self) -> String {
        format!("{}/available", self.prefix)
    }

    /// `<prefix>/<stream>/status`, retained JSON.
    pub fn status(&self, stream: &str) -> String {
        format!("{}/{stream}/status", self.prefix)
    }

    /// `<prefix>/<stream>/<prompt>`: the answer JSON.
    pub fn answer(&self, stream: &str, prompt: &str) -> String {
        format!("{}/{stream}/{prompt}", self.prefix)
    }

    /// `<prefix>/<stream>/<prompt>/alert`: rising edges of alert prompts.
    pub fn alert(&self, stream: &str, prompt: &str) -> String {
        format!("{}/{stream}/{prompt}/alert", self.prefix)
    }

    /// `<prefix>/<stream>/<prompt>/snapshot`: the JPEG of the latest answered window, retained.
    pub fn snapshot(&self, stream: &str, prompt: &str) -> String {
        format!("{}/{stream}/{prompt}/snapshot", self.prefix)
    }

    /// `<prefix>/<stream>/<prompt>/event`: the alert event lifecycle (start, update, end).
    pub fn event(&self, stream: &str, prompt: &str) -> String {
        format!("{}/{stream}/{prompt}/event", self.prefix)
    }

    /// `<prefix>/<stream>/<prompt>/event/state`: `ON` while an event is open, retained.
    pub fn event_state(&self, stream: &str, prompt: &str) -> String {
        format!("{}/{stream}/{prompt}/event/state", self.prefix)
    }

    /// `<prefix>/<stream>/<prompt>/state`: `ON`/`OFF` or the short answer, retained.
    pub fn state(&self, stream: &str, prompt: &str) -> String {
        format!("{}/{stream}/{prompt}/state", self.prefix)
    }

    pub fn stream_set(&self, stream: &str) -> String {
        format!("{}/{stream}/set", self.prefix)
    }

    /// `<prefix>/<stream>/enabled`: echo of the stream's `set` state, retained.
    pub fn stream_enabled(&self, stream: &str) -> String {
        format!("{}/{stream}/enabled", self.prefix)
    }

    pub fn prompt_enabled(&self, stream: &str, prompt: &str) -> String {
        format!("{}/{stream}/{prompt}/enabled", self.prefix)
    }

    pub fn stats(&self) -> String {
        format!("{}/stats", self.prefix)
    }

    pub fn errors(&self) -> String {
        format!("{}/errors", self.prefix)
    }

    /// Subscriptions for commands.
    pub fn set_filters(&self) -> [String; 2] {
        [format!("{}/+/set", self.prefix), format!("{}/+/+/set", self.prefix)]
    }

    /// Which stream or prompt a `set` topic addresses (`None` if it is not a set topic).
    pub fn parse_set(&self, topic: &str) -> Option<SetTarget> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?.strip_suffix("/set")?;
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(s), None, None) if !s.is_empty() => Some(SetTarget::Stream(s.to_string())),
            (Some(s), Some(p), None) if !s.is_empty() && !p.is_empty() => {
                Some(SetTarget::Prompt { stream: s.to_string(), prompt: p.to_string() })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_set_parsing() {
        let t = Topics::new("home/vigil");
        assert_eq!(t.answer("cam1", "person"), "home/vigil/cam1/person");
        assert_eq!(t.state("cam1", "person"), "home/vigil/cam1/person/state");
        assert_eq!(t.parse_set("home/vigil/cam1/set"), Some(SetTarget::Stream("cam1".into())));
        assert_eq!(
            t.parse_set("home/vigil/cam1/person/set"),
            Some(SetTarget::Prompt { stream: "cam1".into(), prompt: "person".into() })
        );
        assert_eq!(t.parse_set("home/vigil/cam1/person/x/set"), None);
        assert_eq!(t.parse_set("other/cam1/set"), None);
        assert_eq!(t.parse_set("home/vigil/set"), None);
        assert_eq!(t.parse_set("home/vigil//set"), None);
    }
}
