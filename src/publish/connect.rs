//! Broker connection settings: `mqtt.*` → rumqttc options, TLS through rustls (ring provider,
//! no OpenSSL), and plain-language, secret-free descriptions of connection failures.
//! The settings are `config::MqttConfig`'s.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{ConnectReturnCode, ConnectionError, LastWill, MqttOptions, QoS, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::PublishError;
use crate::config::{redact_uri, MqttConfig};

/// Where and how to connect, resolved from the config.
#[derive(Debug, Clone)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// The user name sent (for messages; the password is never kept here).
    pub user: Option<String>,
}

impl BrokerAddr {
    /// Parse `mqtt://host[:port]` / `mqtts://host[:port]` (also `tcp://`, `ssl://`).
    pub fn parse(broker: &str) -> Result<BrokerAddr, PublishError> {
        let bad = |why: &str| PublishError::Broker(format!("{:?}: {why}", redact_uri(broker)));
        let u = url::Url::parse(broker).map_err(|e| bad(&e.to_string()))?;
        let tls = match u.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            s => return Err(bad(&format!("unsupported scheme {s:?} (expected mqtt:// or mqtts://)"))),
        };
        let host = u.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad("has no host"))?;
        // IPv6 literals come back bracketed; the socket layer wants them bare.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = u.port().unwrap_or(if tls { 8883 } else { 1883 });
        Ok(BrokerAddr { host, port, tls, user: None })
    }
}

impl std::fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", if self.tls { "mqtts" } else { "mqtt" }, self.host, self.port)
    }
}

/// The broker's address for this config: the embedded broker is reached on loopback (or on
/// the address it listens on when that is a specific one).
pub fn broker_addr(m: &MqttConfig) -> Result<BrokerAddr, PublishError> {
    if m.is_embedded() {
        let host = match m.embedded_listen.as_deref() {
            Some(ip) if !ip.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_unspecified()) => ip.to_string(),
            _ => "127.0.0.1".to_string(),
        };
        return Ok(BrokerAddr { host, port: m.embedded_port, tls: false, user: None });
    }
    BrokerAddr::parse(&m.broker)
}

/// `cfg.mqtt` with its file paths resolved against the config's directory.
pub fn resolved(cfg: &crate::config::Config) -> MqttConfig {
    let mut m = cfg.mqtt.clone();
    for f in [&mut m.password_file, &mut m.ca_file, &mut m.cert_file, &mut m.key_file] {
        if let Some(p) = f.as_mut() {
            *p = cfg.resolve_path(p);
        }
    }
    m
}

pub fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// Read the password: the first line of `password_file`, without its line ending.
pub fn read_password(path: &Path) -> Result<String, PublishError> {
    let text = crate::config::read_bounded(path, crate::config::MAX_SECRET_BYTES)
        .map_err(|e| PublishError::PasswordFile { path: path.to_path_buf(), reason: e.to_string() })?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(PublishError::PasswordFile { path: path.to_path_buf(), reason: "first line is empty".into() });
    }
    Ok(line.to_string())
}

/// rumqttc options for a client of this config. `resolve` turns config-relative paths into
/// absolute ones; `will` is the last will (topic, payload), if any.
pub fn mqtt_options(
    m: &MqttConfig,
    client_id: &str,
    resolve: &dyn Fn(&Path) -> PathBuf,
    will: Option<(String, &str)>,
) -> Result<(MqttOptions, BrokerAddr), PublishError> {
    let mut addr = broker_addr(m)?;
    let mut o = MqttOptions::new(client_id, addr.host.clone(), addr.port);
    // The config refuses 0 ("off": a dead broker would go unnoticed); rumqttc refuses under 1 s.
    o.set_keep_alive(Duration::from_secs(m.keepalive_s.max(1)));
    // A clean session: the outbox (not the broker) keeps unacknowledged messages.
    o.set_clean_session(true);
    o.set_inflight(100);
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((topic, payload)) = will {
        o.set_last_will(LastWill::new(topic, payload.as_bytes().to_vec(), QoS::AtLeastOnce, true));
    }
    // Credentials: `username` + `password_file`; a URL's userinfo is a fallback.
    let url_user = (!m.is_embedded()).then(|| url::Url::parse(&m.broker).ok()).flatten();
    let username =
        m.username.clone().or_else(|| url_user.as_ref().map(|u| u.username().to_string()).filter(|u| !u.is_empty()));
    if let Some(user) = username {
        let password = match &m.password_file {
            Some(pf) => read_password(&resolve(pf))?,
            None => url_user.as_ref().and_then(|u| u.password()).unwrap_or("").to_string(),
        };
        addr.user = Some(user.clone());
        o.set_credentials(user, password);
    }
    if addr.tls {
        let cfg = tls_config(m, resolve)?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(cfg))));
    } else if m.ca_file.is_some() || m.cert_file.is_some() {
        tracing::warn!("mqtt.ca_file/cert_file are set but the broker URL is not mqtts://; connecting without TLS");
    }
    Ok((o, addr))
}

/// rustls client config: `ca_file` (else the system roots) and an optional client certificate.
fn tls_config(m: &MqttConfig, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<rustls::ClientConfig, PublishError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match &m.ca_file {
        Some(ca) => {
            let ca = resolve(ca);
            let certs = read_certs(&ca, "mqtt.ca_file")?;
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(PublishError::Tls(format!("mqtt.ca_file {}: no usable CA certificate", ca.display())));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(PublishError::Tls(
                    "no system CA certificates found; set mqtt.ca_file to the broker's CA".into(),
                ));
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PublishError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    match (&m.cert_file, &m.key_file) {
        (Some(cert), Some(key)) => {
            let cert = resolve(cert);
            let key = resolve(key);
            let chain = read_certs(&cert, "mqtt.cert_file")?;
            let key = PrivateKeyDer::from_pem_file(&key)
                .map_err(|e| PublishError::Tls(format!("mqtt.key_file {}: no private key: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| PublishError::Tls(format!("client certificate/key: {e}")))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, PublishError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| PublishError::Tls(format!("{key} {}: {e}", path.display())))?
        .collect();
    let certs = certs.map_err(|e| PublishError::Tls(format!("{key} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(PublishError::Tls(format!("{key} {}: no PEM certificate in it", path.display())));
    }
    Ok(certs)
}

/// A connection failure in words a user can act on. Never contains the password (rumqttc's
/// errors do not carry it, and the address has no userinfo).
pub fn describe(e: &ConnectionError, addr: &BrokerAddr) -> String {
    let user = addr.user.as_deref();
    match e {
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::BadUserNamePassword => format!(
                "broker {addr} refused the credentials: bad username or password (user {:?})",
                user.unwrap_or("")
            ),
            ConnectReturnCode::NotAuthorized => {
                // mosquitto 2 answers a wrong password with this code, not "bad username or password".
                format!(
                    "broker {addr} refused the connection: not authorized (wrong password for user {:?}, or the user is not allowed)",
                    user.unwrap_or("")
                )
            }
            ConnectReturnCode::BadClientId => {
                format!("broker {addr} rejected the client id (mqtt.client_id)")
            }
            ConnectReturnCode::ServiceUnavailable => format!("broker {addr} is unavailable"),
            other => format!("broker {addr} refused the connection ({other:?})"),
        },
        ConnectionError::Tls(t) => format!("TLS with {addr} failed: {t}"),
        ConnectionError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("cannot reach broker {addr}: connection refused")
        }
        ConnectionError::Io(io) => format!("connection to broker {addr} failed: {io}"),
        ConnectionError::NetworkTimeout => format!("broker {addr} did not answer in time"),
        other => format!("connection to broker {addr} lost: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let a = BrokerAddr::parse("mqtt://example.org").unwrap();
        assert_eq!((a.host.as_str(), a.port, a.tls), ("example.org", 1883, false));
        let a = BrokerAddr::parse("mqtts://u:secret@10.0.0.1:9000").unwrap();
        assert_eq!((a.host.as_str(), a.port, a.tls), ("10.0.0.1", 9000, true));
        let e = BrokerAddr::parse("http://u:secret@h").unwrap_err().to_string();
        assert!(e.contains("unsupported scheme") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn embedded_address_is_loopback_unless_listen_names_one() {
        let mut m = MqttConfig { embedded_port: 1999, ..Default::default() };
        assert_eq!(broker_addr(&m).unwrap().to_string(), "mqtt://127.0.0.1:1999");
        m.embedded_listen = Some("0.0.0.0".into());
        assert_eq!(broker_addr(&m).unwrap().host, "127.0.0.1");
        m.embedded_listen = Some("127.0.0.2".into());
        assert_eq!(broker_addr(&m).unwrap().host, "127.0.0.2");
    }

    #[test]
    fn password_is_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\r\nignored\n").unwrap();
        assert_eq!(read_password(&p).unwrap(), "s3cret");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_password(&p).unwrap_err().to_string().contains("empty"));
    }
}
