//! Home Assistant discovery against a real mosquitto: configs appear (retained) at connect and
//! re-appear when Home Assistant announces `homeassistant/status` = `online`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use vigil::publish::*;

const T: Duration = Duration::from_secs(5);

async fn configs(sub: &mut Sub, n: usize) -> BTreeMap<String, (serde_json::Value, bool)> {
    let mut got = BTreeMap::new();
    while got.len() < n {
        let g = sub
            .next(T)
            .await
            .unwrap_or_else(|| panic!("only {} of {n} discovery configs: {:?}", got.len(), got.keys()));
        if g.topic.ends_with("/config") {
            got.insert(g.topic.clone(), (g.json(), g.retain));
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_configs_appear_and_reappear_on_ha_birth() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let cfg = config(dir.path(), &broker.url(), "homeassistant_discovery = true");
    let mut avail = Sub::connect(broker.port, "sub-avail", &["vt/available"], false).await;
    let (p, _c) = Publisher::start(&cfg, fast()).await.unwrap();
    // `online` goes out after the discovery configs and states.
    assert_eq!(avail.next_on("vt/available", T).await.unwrap().text(), "online");
    avail.stop();

    // A subscriber arriving later sees the retained configs.
    let mut sub = Sub::connect(broker.port, "sub-ha", &["homeassistant/#"], false).await;
    let got = configs(&mut sub, 6).await;
    let want = [
        "homeassistant/sensor/vigil-test/cam1_scene/config",
        "homeassistant/binary_sensor/vigil-test/cam1_person/config",
        "homeassistant/sensor/vigil-test/cam1_count/config",
        "homeassistant/switch/vigil-test/cam1_enabled/config",
        "homeassistant/binary_sensor/vigil-test/yard_2_person/config",
        "homeassistant/switch/vigil-test/yard_2_enabled/config",
    ];
    assert_eq!(got.keys().map(String::as_str).collect::<Vec<_>>().len(), 6);
    for t in want {
        let (c, retained) = got.get(t).unwrap_or_else(|| panic!("{t} missing: {:?}", got.keys()));
        assert!(retained, "{t} is retained");
        assert!(c["unique_id"].as_str().is_some_and(|u| u.starts_with("vigil-test_")), "{c}");
        assert_eq!(c["availability"][0]["topic"], "vt/available", "{c}");
        assert!(c["device"]["identifiers"][0].as_str().is_some(), "{c}");
    }
    let sensor = &got["homeassistant/sensor/vigil-test/cam1_scene/config"].0;
    assert_eq!(sensor["state_topic"], "vt/cam1/scene/state");
    assert_eq!(sensor["json_attributes_topic"], "vt/cam1/scene");
    assert_eq!(sensor["device"]["identifiers"][0], "vigil-test_cam1");
    let alert = &got["homeassistant/binary_sensor/vigil-test/cam1_person/config"].0;
    assert_eq!(
        (alert["state_topic"].as_str(), alert["payload_on"].as_str()),
        (Some("vt/cam1/person/event/state"), Some("ON"))
    );
    let switch = &got["homeassistant/switch/vigil-test/yard_2_enabled/config"].0;
    assert_eq!(switch["command_topic"], "vt/yard.2/set");
    assert_eq!(switch["state_topic"], "vt/yard.2/enabled");
    // Unique ids are unique.
    let ids: std::collections::HashSet<_> = got.values().map(|(c, _)| c["unique_id"].to_string()).collect();
    assert_eq!(ids.len(), 6);
    assert!(sub.drain(Duration::from_millis(300)).await.iter().all(|g| !g.topic.ends_with("/config")));

    // Home Assistant restarts: its birth message makes vigil publish every config again (live,
    // so the broker delivers them with retain = false to this existing subscriber).
    sub.client.publish("homeassistant/status", rumqttc::QoS::AtLeastOnce, false, "online").await.unwrap();
    let again = configs(&mut sub, 6).await;
    assert_eq!(again.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>());
    assert!(again.values().all(|(_, retained)| !retained));
    for (t, (c, _)) in &again {
        assert_eq!(c, &got[t].0);
    }
    // `offline` from HA changes nothing.
    sub.client.publish("homeassistant/status", rumqttc::QoS::AtLeastOnce, false, "offline").await.unwrap();
    assert!(sub.drain(Duration::from_millis(500)).await.iter().all(|g| !g.topic.ends_with("/config")));
    p.shutdown(T).await;
    sub.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconfigure_announces_added_streams_and_retracts_removed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let cfg = config(dir.path(), &broker.url(), "homeassistant_discovery = true");
    let (p, _commands) = Publisher::start(&cfg, fast()).await.unwrap();
    let mut sub = Sub::connect(broker.port, "sub-reload", &["homeassistant/#", "vt/#"], false).await;
    let _ = configs(&mut sub, 6).await;
    let _ = sub.drain(Duration::from_millis(300)).await;

    // The reload drops yard.2 and adds cam3 (person prompt).
    let mut new = cfg.clone();
    new.streams.retain(|s| s.name != "yard.2");
    let mut cam3 = new.streams[0].clone();
    cam3.name = "cam3".into();
    cam3.prompts = vec!["person".into()];
    new.streams.push(cam3);
    p.reconfigure(&new);

    let got = sub.drain(Duration::from_millis(800)).await;
    let payload_of = |t: &str| got.iter().find(|g| g.topic == t).map(|g| g.payload.clone());
    for gone in [
        "homeassistant/binary_sensor/vigil-test/yard_2_person/config",
        "homeassistant/switch/vigil-test/yard_2_enabled/config",
    ] {
        assert_eq!(payload_of(gone), Some(Vec::new()), "{gone} must be retracted with an empty config");
    }
    for added in [
        "homeassistant/binary_sensor/vigil-test/cam3_person/config",
        "homeassistant/switch/vigil-test/cam3_enabled/config",
    ] {
        assert!(payload_of(added).is_some_and(|p| !p.is_empty()), "{added} must be announced");
    }
    assert_eq!(payload_of("vt/cam3/enabled").as_deref(), Some(&b"ON"[..]));
    // cam1 stays as it was: its enabled state is not re-announced (a `set OFF` would survive).
    assert_eq!(payload_of("vt/cam1/enabled"), None);

    // `set` commands for the new stream are accepted (echoed), for the removed one refused.
    sub.client.publish("vt/cam3/set", rumqttc::QoS::AtLeastOnce, false, "OFF").await.unwrap();
    assert_eq!(sub.next_on("vt/cam3/enabled", T).await.map(|g| g.text()).as_deref(), Some("OFF"));
    sub.client.publish("vt/yard.2/set", rumqttc::QoS::AtLeastOnce, false, "ON").await.unwrap();
    let err = sub.next_on("vt/errors", T).await.expect("an error for the removed stream");
    assert!(err.text().contains("no such stream"), "{}", err.text());
}
