//! The embedded broker: `mqtt.broker = "embedded"` runs rumqttd in-process so the demo needs no
//! external broker.
//!
//! It binds 127.0.0.1 unless `mqtt.embedded_listen` names another address. With
//! `mqtt.username` + `password_file` it requires those credentials of every client (vigil
//! itself included); the config refuses a non-loopback address without them, so an open broker
//! never appears on the network by accident.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::PublishError;
use crate::config::MqttConfig;

/// A running in-process broker. rumqttd cannot be stopped from outside; its threads end with
/// the process, which is what a daemon wants.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

impl EmbeddedBroker {
    /// The address the config asks for: `embedded_listen` (default 127.0.0.1) and `embedded_port`.
    pub fn listen_addr(m: &MqttConfig) -> Result<SocketAddr, PublishError> {
        let ip: IpAddr = match m.embedded_listen.as_deref() {
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(s) => s
                .parse()
                .map_err(|_| PublishError::Embedded(format!("mqtt.embedded_listen {s:?} is not an IP address")))?,
        };
        Ok(SocketAddr::new(ip, m.embedded_port))
    }

    /// Start rumqttd on `addr` and wait until it accepts connections. With `login` (user,
    /// password), clients must present it.
    pub fn start(addr: SocketAddr, login: Option<(String, String)>) -> Result<EmbeddedBroker, PublishError> {
        // rumqttd only logs a failed bind from its own thread; try it here first so the user
        // gets the reason (typically a mosquitto already on 1883).
        TcpListener::bind(addr).map_err(|e| {
            PublishError::Embedded(format!(
                "cannot listen on {addr}: {e} (another broker running? set mqtt.embedded_port or use an external broker)"
            ))
        })?;
        let open = login.is_none();
        let mut broker = rumqttd::Broker::new(broker_config(addr, login));
        std::thread::Builder::new()
            .name("vigil-broker".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!("embedded MQTT broker stopped: {e}");
                }
            })
            .map_err(|e| PublishError::Embedded(format!("cannot start broker thread: {e}")))?;
        let probe = if addr.ip().is_unspecified() {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        } else {
            addr
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&probe, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                return Err(PublishError::Embedded(format!("broker on {addr} did not start listening within 5 s")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !addr.ip().is_loopback() && open {
            tracing::warn!("embedded MQTT broker listens on {addr} without authentication");
        }
        tracing::info!("embedded MQTT broker listening on {addr}");
        Ok(EmbeddedBroker { addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn broker_config(addr: SocketAddr, login: Option<(String, String)>) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        // Answers with long texts and discovery configs exceed rumqttd's 20 KiB example limit.
        max_payload_size: 1 << 20,
        max_inflight_count: 200,
        auth: login.map(|(user, pass)| HashMap::from([(user, pass)])),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "vigil-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let router = rumqttd::RouterConfig {
        max_connections: 1000,
        max_outgoing_packet_count: 200,
        max_segment_size: 10 << 20,
        max_segment_count: 10,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    rumqttd::Config { id: 0, router, v4: Some(HashMap::from([("1".to_string(), server)])), ..Default::default() }
}
