//! Credentials and TLS against a real mosquitto: refused passwords give a clear, secret-free
//! error and are retried; mqtts:// with a CA, server and client certificates made here by rcgen.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use vigil::publish::*;

const T: Duration = Duration::from_secs(5);

/// A password file for mosquitto made by `mosquitto_passwd` (Debian package `mosquitto`).
fn mosquitto_passwords(dir: &Path, user: &str, password: &str) -> PathBuf {
    let f = dir.join("passwd");
    let st = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&f)
        .args([user, password])
        .status()
        .expect("run mosquitto_passwd");
    assert!(st.success());
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_a_clear_error_and_retried_then_right_one_works() {
    let dir = tempfile::tempdir().unwrap();
    let pw = mosquitto_passwords(dir.path(), "vigil", "right-horse-battery");
    let broker = Mosquitto::start(dir.path(), &format!("allow_anonymous false\npassword_file {}", pw.display()));
    std::fs::write(dir.path().join("wrong.pass"), "wrong-staple-9\n").unwrap();
    let cfg = config(dir.path(), &broker.url(), "username = \"vigil\"\npassword_file = \"wrong.pass\"");
    let (p, _c) = Publisher::start(&cfg, fast()).await.unwrap();
    let l = wait_link(&p, T, |l| l.failures >= 3).await;
    let err = l.last_error.unwrap();
    assert!(
        err.contains("refused") && (err.contains("bad username or password") || err.contains("not authorized")),
        "{err}"
    );
    assert!(err.contains("\"vigil\"") && err.contains(&format!("127.0.0.1:{}", broker.port)), "{err}");
    eprintln!("refused: {err}");
    assert!(!err.contains("wrong-staple-9"), "the password never appears: {err}");
    assert!(!l.connected && l.connects == 0);
    p.kill();

    // The right password (first line of the file; the rest is ignored) connects and publishes.
    std::fs::write(dir.path().join("right.pass"), "right-horse-battery\nsecond line\n").unwrap();
    let cfg = config(dir.path(), &broker.url(), "username = \"vigil\"\npassword_file = \"right.pass\"");
    let mut o = rumqttc::MqttOptions::new("sub-auth", "127.0.0.1", broker.port);
    o.set_credentials("vigil", "right-horse-battery");
    let mut sub = Sub::connect_with(o, &["vt/cam1/scene"], false).await;
    let (p, _c) = Publisher::start(&cfg, fast()).await.unwrap();
    wait_link(&p, T, |l| l.connected).await;
    p.answer(&answer("cam1", "scene", "caption", 0));
    assert_eq!(sub.next_on("vt/cam1/scene", T).await.expect("answer").json()["id"], "cam1:0:scene");
    p.shutdown(T).await;
    sub.stop();
}

struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files.
fn pki(dir: &Path, name: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, format!("vigil test CA {name}"));
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let mut sp = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    sp.distinguished_name.push(DnType::CommonName, "mosquitto");
    let skey = KeyPair::generate().unwrap();
    let scert = sp.signed_by(&skey, &ca).unwrap();

    let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
    cp.distinguished_name.push(DnType::CommonName, "vigil-client");
    let ckey = KeyPair::generate().unwrap();
    let ccert = cp.signed_by(&ckey, &ca).unwrap();

    let w = |f: &str, s: String| {
        let p = dir.join(format!("{name}-{f}"));
        std::fs::write(&p, s).unwrap();
        p
    };
    Pki {
        ca: w("ca.pem", ca.pem()),
        server_cert: w("server.pem", scert.pem()),
        server_key: w("server.key", skey.serialize_pem()),
        client_cert: w("client.pem", ccert.pem()),
        client_key: w("client.key", ckey.serialize_pem()),
    }
}

/// mosquitto with its plain listener (for the test's subscriber) and a TLS listener that
/// requires a client certificate from the CA.
fn tls_broker(dir: &Path, pki: &Pki, tls_port: u16) -> Mosquitto {
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        pki.ca.display(),
        pki.server_cert.display(),
        pki.server_key.display()
    );
    Mosquitto::start(dir, &extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_ca_and_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "good");
    let tls_port = free_port();
    let broker = tls_broker(dir.path(), &pki, tls_port);
    let extra = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        pki.ca.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    );
    let cfg = config(dir.path(), &format!("mqtts://127.0.0.1:{tls_port}"), &extra);
    let mut sub = Sub::connect(broker.port, "sub-tls", &["vt/#"], false).await;
    let (p, _c) = Publisher::start(&cfg, fast()).await.unwrap();
    wait_link(&p, T, |l| l.connected).await;
    assert_eq!(sub.next_on("vt/available", T).await.unwrap().text(), "online");
    let a = answer("cam1", "scene", "caption", 4);
    p.answer(&a);
    let g = sub.next_on("vt/cam1/scene", T).await.expect("answer over TLS");
    assert_eq!(serde_json::from_slice::<Answer>(&g.payload).unwrap(), a);
    p.shutdown(T).await;
    sub.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_unknown_ca_is_a_clear_tls_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = pki(dir.path(), "good");
    let other = pki(dir.path(), "other");
    let tls_port = free_port();
    let _broker = tls_broker(dir.path(), &good, tls_port);
    // Trusts another CA: the server's certificate must be rejected.
    let extra = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        other.ca.display(),
        good.client_cert.display(),
        good.client_key.display()
    );
    let cfg = config(dir.path(), &format!("mqtts://127.0.0.1:{tls_port}"), &extra);
    let (p, _c) = Publisher::start(&cfg, fast()).await.unwrap();
    let l = wait_link(&p, T, |l| l.failures >= 2).await;
    let err = l.last_error.unwrap();
    eprintln!("tls: {err}");
    assert!(err.starts_with("TLS with mqtts://127.0.0.1:"), "{err}");
    assert!(err.contains("UnknownIssuer") || err.contains("certificate"), "{err}");
    p.kill();

    // A missing client certificate is refused by the broker: also reported, also retried.
    let extra = format!("ca_file = \"{}\"", good.ca.display());
    let cfg = config(dir.path(), &format!("mqtts://127.0.0.1:{tls_port}"), &extra);
    let (p, _c) = Publisher::start(&cfg, fast()).await.unwrap();
    let l = wait_link(&p, T, |l| l.failures >= 2).await;
    assert!(!l.connected, "{l:?}");
    p.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_tls_files_fail_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notpem.pem"), "hello").unwrap();
    let cfg = config(dir.path(), "mqtts://127.0.0.1:1", "ca_file = \"notpem.pem\"");
    let e = Publisher::start(&cfg, fast()).await.err().expect("an error").to_string();
    assert!(e.contains("mqtt.ca_file") && e.contains("notpem.pem"), "{e}");
}
