//! The embedded broker (rumqttd in-process, loopback) round-trips with `vigil tail` run as a
//! real subprocess.
#![cfg(feature = "embedded-broker")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::schema::{assert_valid, load};
use common::*;
use vigil::publish::*;

const T: Duration = Duration::from_secs(5);

/// Lines of a child's pipe, read on a thread.
fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Start `vigil tail` and wait until it has subscribed.
fn spawn_tail(args: &[&str]) -> (KillOnDrop, mpsc::Receiver<String>, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .arg("tail")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines(child.stdout.take().unwrap());
    let err = lines(child.stderr.take().unwrap());
    let child = KillOnDrop(child);
    loop {
        let l = err.recv_timeout(T).expect("vigil tail announces its subscription within 5 s");
        if l.contains("vigil tail: subscribed to") {
            break;
        }
    }
    (child, out, err)
}

fn wait_exit(child: &mut KillOnDrop) -> std::process::ExitStatus {
    let child = &mut child.0;
    let deadline = std::time::Instant::now() + T;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("vigil tail did not exit after its count");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_round_trips_with_vigil_tail() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = config(dir.path(), "embedded", &format!("embedded_port = {port}"));
    let (p, _c) = Publisher::start(&cfg, fast()).await.unwrap();
    let addr = p.embedded_addr().expect("embedded broker started");
    assert!(addr.ip().is_loopback(), "loopback only by default: {addr}");
    assert_eq!(addr.port(), port);
    wait_link(&p, T, |l| l.connected).await;

    // Human-readable, from a broker URL.
    let url = format!("mqtt://127.0.0.1:{port}");
    let (mut human, out, _err) = spawn_tail(&["--broker", &url, "--prefix", "vt", "-n", "3"]);
    // `--config`: JSON lines, the broker and prefix taken from the file (embedded → loopback).
    let cfg_path = dir.path().join("vigil.toml");
    let (mut json, jout, _jerr) = spawn_tail(&["--config", cfg_path.to_str().unwrap(), "--json", "-n", "3"]);

    let scene = answer("cam1", "scene", "caption", 0);
    let person = answer("cam1", "person", "alert", 1); // true: answer + alert
    p.status("cam1", &StatusPayload { state: StreamState::Streaming, since: now_rfc3339(), error: None }); // not printed
    p.answer(&scene);
    p.answer(&person);

    let got: Vec<String> = (0..3).map(|_| out.recv_timeout(T).expect("tail line")).collect();
    assert!(wait_exit(&mut human).success());
    assert!(
        got[0].contains("cam1/scene") && got[0].contains("[0.0–7.0 s]") && got[0].contains(&scene.answer),
        "{got:?}"
    );
    assert!(got[0].starts_with(&scene.window.start[..10]), "window time first: {got:?}");
    let rest = &got[1..];
    assert!(rest.iter().any(|l| l.contains("cam1/person") && l.contains("ALERT: ")), "{got:?}");
    assert!(
        rest.iter().any(|l| l.contains("cam1/person") && l.contains("[8.0–15.0 s]") && !l.contains("ALERT")),
        "{got:?}"
    );

    let got: Vec<serde_json::Value> =
        (0..3).map(|_| serde_json::from_str(&jout.recv_timeout(T).expect("json line")).unwrap()).collect();
    assert!(wait_exit(&mut json).success());
    let answers: Vec<&serde_json::Value> = got.iter().filter(|v| v.get("question").is_some()).collect();
    assert_eq!(answers.len(), 2, "{got:?}");
    let schema = load("answer.v1.schema.json");
    for a in &answers {
        assert_valid(&schema, a);
    }
    assert_eq!(serde_json::from_value::<Answer>(answers[0].clone()).unwrap(), scene);
    assert_eq!(serde_json::from_value::<Answer>(answers[1].clone()).unwrap(), person);
    let alert = got.iter().find(|v| v.get("question").is_none()).unwrap();
    assert_valid(&load("alert.v1.schema.json"), alert);

    // Retained availability works on the embedded broker too.
    let mut sub = Sub::connect(port, "sub-emb", &["vt/available"], false).await;
    assert_eq!(sub.next_on("vt/available", T).await.unwrap().text(), "online");
    p.shutdown(T).await;
    assert_eq!(sub.next_on("vt/available", T).await.unwrap().text(), "stopped");
    sub.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_port_in_use_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = config(dir.path(), "embedded", &format!("embedded_port = {port}"));
    let e = Publisher::start(&cfg, fast()).await.err().expect("an error").to_string();
    assert!(e.contains(&format!("127.0.0.1:{port}")) && e.contains("embedded_port"), "{e}");
}

#[test]
fn tail_with_refused_credentials_exits_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    assert!(Command::new("mosquitto_passwd").args(["-b", "-c"]).arg(&pw).args(["u", "p"]).status().unwrap().success());
    let broker = Mosquitto::start(dir.path(), &format!("allow_anonymous false\npassword_file {}", pw.display()));
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["tail", "--broker", &format!("mqtt://nobody:zebra42@127.0.0.1:{}", broker.port)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not authorized") || err.contains("bad username"), "{err}");
    assert!(err.contains("\"nobody\"") && !err.contains("zebra42"), "user named, no password in the message: {err}");
}

/// With `username` + `password_file`, the embedded broker requires them: vigil itself gets in,
/// a client with the same credentials too, an anonymous one (or a wrong password) does not and
/// so cannot overwrite the retained availability.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_with_credentials_refuses_anonymous_clients() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(dir.path().join("broker.pw"), "s3cret\n").unwrap();
    let extra = format!("embedded_port = {port}\nusername = \"vigil\"\npassword_file = \"broker.pw\"");
    let cfg = config(dir.path(), "embedded", &extra);
    let (p, _c) = Publisher::start(&cfg, fast()).await.unwrap();
    wait_link(&p, T, |l| l.connected).await;

    // A refused client: the first poll answers with the broker's refusal or a closed connection.
    async fn refused(o: rumqttc::MqttOptions) -> bool {
        let (_client, mut el) = rumqttc::AsyncClient::new(o, 10);
        match tokio::time::timeout(T, el.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)))) => {
                a.code != rumqttc::ConnectReturnCode::Success
            }
            Ok(Ok(_)) => false,
            Ok(Err(_)) => true,
            Err(_) => panic!("no answer from the embedded broker within {T:?}"),
        }
    }
    assert!(refused(rumqttc::MqttOptions::new("anon", "127.0.0.1", port)).await, "anonymous clients are refused");
    let mut wrong = rumqttc::MqttOptions::new("wrong", "127.0.0.1", port);
    wrong.set_credentials("vigil", "guess");
    assert!(refused(wrong).await, "a wrong password is refused");

    let mut o = rumqttc::MqttOptions::new("sub-auth", "127.0.0.1", port);
    o.set_credentials("vigil", "s3cret");
    let mut sub = Sub::connect_with(o, &["vt/available", "vt/cam1/scene"], false).await;
    assert_eq!(sub.next_on("vt/available", T).await.unwrap().text(), "online");
    p.answer(&answer("cam1", "scene", "caption", 0));
    assert!(sub.next_on("vt/cam1/scene", T).await.is_some(), "answers reach an authenticated subscriber");
    p.shutdown(T).await;
    sub.stop();
}
