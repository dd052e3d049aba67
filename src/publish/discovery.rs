//! Home Assistant MQTT discovery configs. Reference: Home
//! Assistant's MQTT discovery documentation (config topic
//! `<discovery_prefix>/<component>/<node_id>/<object_id>/config`, retained JSON).
//!
//! Per stream one device; per prompt a `sensor` (state = short answer, full answer as
//! attributes) or, for alert prompts, a `binary_sensor`; per stream a `switch` on its `set`
//! topic. Availability maps our `stopped` to offline too (HA ignores payloads it does not know,
//! so a plain `payload_not_available` would leave entities "available" after a clean stop).

use serde_json::{json, Value};

use super::Topics;
use crate::config::{Config, PromptKind};

/// One discovery message: retained `payload` on `topic`.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveryConfig {
    pub topic: String,
    pub payload: Value,
}

/// A topic level HA accepts for node and object ids: `[A-Za-z0-9_-]`.
fn level(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// Every discovery config for this configuration, in a stable order.
pub fn configs(cfg: &Config, topics: &Topics) -> Vec<DiscoveryConfig> {
    let m = &cfg.mqtt;
    let node = level(&m.client_id);
    let availability = json!([{
        "topic": topics.available(),
        "value_template": "{{ 'online' if value == 'online' else 'offline' }}",
    }]);
    let model_id = cfg.model.model_id();
    let mut out = Vec::new();
    for s in &cfg.streams {
        let device = json!({
            "identifiers": [format!("{node}_{}", level(&s.name))],
            "name": format!("vigil {}", s.name),
            "manufacturer": "vigil",
            "model": model_id,
            "sw_version": env!("CARGO_PKG_VERSION"),
        });
        for p in s.prompts.iter().filter_map(|p| cfg.prompt(p)) {
            let object = format!("{}_{}", level(&s.name), level(&p.name));
            let unique_id = format!("{node}_{object}");
            let common = |component: &str| {
                json!({
                    "name": p.name,
                    "unique_id": unique_id,
                    "object_id": format!("vigil_{object}"),
                    "state_topic": topics.state(&s.name, &p.name),
                    "json_attributes_topic": topics.answer(&s.name, &p.name),
                    "availability": availability,
                    "device": device,
                    "qos": m.qos,
                    "platform": component,
                })
            };
            let (component, mut payload) = match p.kind {
                PromptKind::Alert => {
                    let mut v = common("binary_sensor");
                    // On while an event is open (confirmed, not yet cleared): not every answer.
                    v["state_topic"] = json!(topics.event_state(&s.name, &p.name));
                    v["payload_on"] = json!("ON");
                    v["payload_off"] = json!("OFF");
                    ("binary_sensor", v)
                }
                PromptKind::Caption | PromptKind::Json => {
                    let mut v = common("sensor");
                    v["icon"] = json!("mdi:eye");
                    ("sensor", v)
                }
            };
            // `platform` is only needed in device-based discovery; drop it for component topics.
            payload.as_object_mut().map(|o| o.remove("platform"));
            out.push(DiscoveryConfig {
                topic: format!("{}/{component}/{node}/{object}/config", m.discovery_prefix),
                payload,
            });
            if p.snapshot {
                out.push(DiscoveryConfig {
                    topic: format!("{}/image/{node}/{object}_snapshot/config", m.discovery_prefix),
                    payload: json!({
                        "name": format!("{} snapshot", p.name),
                        "unique_id": format!("{unique_id}_snapshot"),
                        "object_id": format!("vigil_{object}_snapshot"),
                        "image_topic": topics.snapshot(&s.name, &p.name),
                        "content_type": "image/jpeg",
                        "availability": availability,
                        "device": device,
                    }),
                });
            }
        }
        let object = format!("{}_enabled", level(&s.name));
        out.push(DiscoveryConfig {
            topic: format!("{}/switch/{node}/{object}/config", m.discovery_prefix),
            payload: json!({
                "name": "enabled",
                "unique_id": format!("{node}_{object}"),
                "object_id": format!("vigil_{object}"),
                "command_topic": topics.stream_set(&s.name),
                "state_topic": topics.stream_enabled(&s.name),
                "payload_on": "ON",
                "payload_off": "OFF",
                "availability": availability,
                "device": device,
                "qos": m.qos,
                "icon": "mdi:cctv",
            }),
        });
    }
    out
}

/// The topic Home Assistant announces itself on (`online` after it starts).
pub fn status_topic(cfg: &Config) -> String {
    format!("{}/status", cfg.mqtt.discovery_prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_prompt_gets_an_image_entity() {
        let text = "[model]\npath = \"m\"\n[mqtt]\nhomeassistant_discovery = true\n\
                    [[prompt]]\nname = \"door\"\ntext = \"Who?\"\nsnapshot = true\n\
                    [[stream]]\nname = \"cam\"\nuri = \"rtsp://cam.local/s\"\nprompts = [\"door\"]\n";
        let cfg = Config::parse(text, "t.toml", std::path::Path::new(".")).unwrap();
        let topics = Topics::new(&cfg.mqtt.topic_prefix);
        let all = configs(&cfg, &topics);
        let image = all.iter().find(|d| d.topic.starts_with("homeassistant/image/")).expect("an image entity");
        assert_eq!(image.payload["image_topic"], "vigil/cam/door/snapshot");
        assert_eq!(image.payload["content_type"], "image/jpeg");
        assert_eq!(image.payload["device"], all[0].payload["device"], "on the stream's device");
    }
}
