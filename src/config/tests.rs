use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "test.toml", Path::new("."))
}

const MINIMAL: &str = r#"
[model]
path = "m"

[[prompt]]
name = "caption"
text = "Describe."

[[stream]]
name = "cam"
uri = "rtsp://cam.local/s"
prompts = ["caption"]
"#;

fn one_problem(text: &str) -> Problem {
    let e = parse(text).expect_err("config should be rejected");
    let p = e.problems();
    assert_eq!(p.len(), 1, "expected one problem, got {p:?}");
    p[0].clone()
}

#[test]
fn defaults_fill_every_section() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.model.device, "cuda:0");
    assert_eq!(c.model.dtype, DType::Bf16);
    assert_eq!(c.model.max_new_tokens, 64);
    assert_eq!(c.model.temperature, 0.0);
    assert_eq!(c.model.top_p, 1.0);
    assert!(c.pruning.enabled);
    assert_eq!(c.pruning.threshold, 0.1);
    assert_eq!(c.pruning.min_tokens_per_frame, 1);
    assert_eq!(c.mqtt.broker, "embedded");
    assert_eq!(c.mqtt.topic_prefix, "vigil");
    assert_eq!(c.mqtt.qos, 1);
    assert_eq!(c.mqtt.outbox_capacity, 1000);
    assert!(!c.mqtt.homeassistant_discovery);
    assert_eq!(c.metrics.listen, "127.0.0.1:9464");
    let s = &c.streams[0];
    assert_eq!(s.settings.fps, 1.0);
    assert_eq!(s.settings.window_seconds, 8.0);
    assert_eq!(s.settings.stride_seconds, 8.0);
    assert_eq!(s.settings.max_frame_pixels, 200_704);
    assert_eq!(s.settings.gap_policy, GapPolicy::Emit);
    assert_eq!(s.settings.transport, RtspTransport::Tcp);
    assert_eq!(s.settings.reconnect_min_s, 1.0);
    assert_eq!(s.settings.reconnect_max_s, 30.0);
    assert!(s.enabled);
    assert_eq!(c.prompts[0].kind, PromptKind::Caption);
    assert_eq!(c.prompts[0].every, 1);
    assert_eq!(s.source_kind(), SourceKind::Rtsp);
}

#[test]
fn stream_overrides_win_over_defaults() {
    let text = MINIMAL.replace(
        "[[stream]]",
        "[defaults]\nfps = 2.0\nwindow_seconds = 4.0\n\n[[stream]]\nstride_seconds = 2.0\nloop = true",
    );
    let c = parse(&text).unwrap();
    let s = &c.streams[0].settings;
    assert_eq!((s.fps, s.window_seconds, s.stride_seconds, s.loop_), (2.0, 4.0, 2.0, true));
}

#[test]
fn device_strings() {
    assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
    assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
    assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
    assert!("gpu".parse::<Device>().is_err());
    assert!("cuda:x".parse::<Device>().is_err());
}

#[test]
fn unknown_key_is_located_with_suggestion() {
    let text = MINIMAL.replace("prompts = [\"caption\"]", "prompts = [\"caption\"]\nfsp = 2.0");
    let p = one_problem(&text);
    assert_eq!(p.key, "stream[0].fsp");
    assert_eq!(p.line, 13);
    assert_eq!(p.col, 1);
    assert!(p.message.contains("did you mean `fps`"), "{}", p.message);
}

#[test]
fn unknown_section_is_rejected() {
    let p = one_problem(&format!("{MINIMAL}\n[modle]\npath = \"x\"\n"));
    assert!(p.message.contains("unknown key `modle`"), "{}", p.message);
    assert!(p.message.contains("did you mean `model`"), "{}", p.message);
    assert_eq!(p.line, 14);
}

#[test]
fn attention_mode_parses_and_defaults_to_auto() {
    use crate::config::AttentionMode;
    assert_eq!(Config::parse(MINIMAL, "m", Path::new(".")).unwrap().model.attention, AttentionMode::Auto);
    let c =
        Config::parse(&MINIMAL.replace("path = \"m\"", "path = \"m\"\nattention = \"reference\""), "m", Path::new("."))
            .unwrap();
    assert_eq!(c.model.attention, AttentionMode::Reference);
    assert_eq!("fused".parse::<AttentionMode>(), Ok(AttentionMode::Fused));
    assert!("flash".parse::<AttentionMode>().is_err());
    let p = one_problem(&MINIMAL.replace("path = \"m\"", "path = \"m\"\nattention = \"fsued\""));
    assert_eq!(p.key, "model.attention");
    assert_eq!(p.line, 4);
    assert!(p.message.contains("did you mean `fused`"), "{}", p.message);
}

#[test]
fn type_error_names_key() {
    let p = one_problem(&MINIMAL.replace("path = \"m\"", "path = \"m\"\nmax_new_tokens = \"many\""));
    assert_eq!(p.key, "model.max_new_tokens");
    assert_eq!(p.line, 4);
}

#[test]
fn bad_enum_value_suggests() {
    let p = one_problem(&MINIMAL.replace("path = \"m\"", "path = \"m\"\ndtype = \"bf61\""));
    assert_eq!(p.key, "model.dtype");
    assert!(p.message.contains("did you mean `bf16`"), "{}", p.message);
}

#[test]
fn semantic_rules() {
    let cases: &[(&str, &str, &str)] = &[
        ("path = \"m\"", "repo = \"a/b\"\npath = \"m\"", "model.repo"),
        ("path = \"m\"", "device = \"cpu\"", "model"),
        ("path = \"m\"", "path = \"m\"\ndevice = \"gpu\"", "model.device"),
        ("path = \"m\"", "path = \"m\"\ntemperature = -1.0", "model.temperature"),
        ("path = \"m\"", "path = \"m\"\ntop_p = 0.0", "model.top_p"),
        ("path = \"m\"", "path = \"m\"\nmax_new_tokens = 0", "model.max_new_tokens"),
        ("[[prompt]]", "[mqtt]\nqos = 3\n\n[[prompt]]", "mqtt.qos"),
        ("[[prompt]]", "[mqtt]\nbroker = \"localhost:1883\"\n\n[[prompt]]", "mqtt.broker"),
        ("[[prompt]]", "[mqtt]\nbroker = \"http://h\"\n\n[[prompt]]", "mqtt.broker"),
        ("[[prompt]]", "[mqtt]\ntopic_prefix = \"a/#\"\n\n[[prompt]]", "mqtt.topic_prefix"),
        ("[[prompt]]", "[metrics]\nlisten = \"nowhere\"\n\n[[prompt]]", "metrics.listen"),
        ("[[prompt]]", "[pruning]\nthreshold = -0.1\n\n[[prompt]]", "pruning.threshold"),
        ("[[prompt]]", "[pruning]\nmin_tokens_per_frame = 0\n\n[[prompt]]", "pruning.min_tokens_per_frame"),
        ("[[prompt]]", "[engine]\nmax_batch = 0\n\n[[prompt]]", "engine.max_batch"),
        ("[[prompt]]", "[defaults]\nfps = 0.0\n\n[[prompt]]", "defaults.fps"),
        ("prompts = [\"caption\"]", "prompts = [\"caption\"]\nfps = -1.0", "stream[0].fps"),
        (
            "prompts = [\"caption\"]",
            "prompts = [\"caption\"]\nfps = 1.0\nwindow_seconds = 0.5",
            "stream[0].window_seconds",
        ),
        ("prompts = [\"caption\"]", "prompts = [\"caption\"]\nstride_seconds = 0.0", "stream[0].stride_seconds"),
        ("prompts = [\"caption\"]", "prompts = [\"caption\"]\nreconnect_max_s = 0.5", "stream[0].reconnect_max_s"),
        ("prompts = [\"caption\"]", "prompts = [\"caption\"]\nmax_frame_pixels = 10", "stream[0].max_frame_pixels"),
        ("prompts = [\"caption\"]", "prompts = [\"captoin\"]", "stream[0].prompts"),
        ("uri = \"rtsp://cam.local/s\"", "uri = \"ftp://cam/s\"", "stream[0].uri"),
        ("uri = \"rtsp://cam.local/s\"", "uri = \"rtsp:///s\"", "stream[0].uri"),
        ("uri = \"rtsp://cam.local/s\"", "uri = \"\"", "stream[0].uri"),
        ("name = \"cam\"", "name = \"front door\"", "stream[0].name"),
        ("text = \"Describe.\"", "text = \"Describe.\"\nevery = 0", "prompt[0].every"),
        ("text = \"Describe.\"", "text = \"  \"", "prompt[0].text"),
        ("text = \"Describe.\"", "text = \"Describe.\"\nconfirm_windows = 2", "prompt[0].confirm_windows"),
        ("text = \"Describe.\"", "text = \"Describe.\"\nactive = [\"7-22\"]", "prompt[0].active"),
        ("text = \"Describe.\"", "text = \"Describe.\"\ndays = [\"funday\"]", "prompt[0].days"),
        (
            "text = \"Describe.\"",
            "text = \"Describe.\"\nkind = \"alert\"\nclear_windows = 0",
            "prompt[0].clear_windows",
        ),
        ("text = \"Describe.\"", "text = \"Describe.\"\nkind = \"alert\"\ncooldown_s = -1.0", "prompt[0].cooldown_s"),
        (
            "prompts = [\"caption\"]",
            "prompts = [\"caption\"]\npassword_file = \"/nonexistent/pw\"",
            "stream[0].password_file",
        ),
    ];
    for (from, to, key) in cases {
        let text = MINIMAL.replacen(from, to, 1);
        assert_ne!(text, MINIMAL, "case {key}: pattern {from:?} not found");
        let p = one_problem(&text);
        assert_eq!(&p.key, key, "case {to:?}: {p:?}");
        assert!(p.line > 0 && p.col > 0, "case {key}: unlocated {p:?}");
    }
}

/// Every input has a bound: each case is rejected with a located problem on its key.
#[test]
fn inputs_beyond_their_caps_are_rejected_where_written() {
    let long_name = "c".repeat(MAX_NAME_CHARS + 1);
    let long_text = format!("text = \"{}\"", "x".repeat(MAX_PROMPT_CHARS + 1));
    let long_prefix = format!("[mqtt]\ntopic_prefix = \"{}\"\n\n[[prompt]]", "p".repeat(MAX_TOPIC_PREFIX_CHARS + 1));
    let long_client = format!("[mqtt]\nclient_id = \"{}\"\n\n[[prompt]]", "c".repeat(MAX_CLIENT_ID_CHARS + 1));
    let stream = |extra: &str| format!("prompts = [\"caption\"]\n{extra}");
    let cases: Vec<(String, String, &str)> = vec![
        ("name = \"cam\"".into(), format!("name = \"{long_name}\""), "stream[0].name"),
        ("text = \"Describe.\"".into(), long_text, "prompt[0].text"),
        ("[[stream]]".into(), "[[prompt]]\nname = \"set\"\ntext = \"Hi.\"\n\n[[stream]]".into(), "prompt[1].name"),
        ("[[prompt]]".into(), long_prefix, "mqtt.topic_prefix"),
        ("[[prompt]]".into(), long_client, "mqtt.client_id"),
        ("[[prompt]]".into(), "[mqtt]\nkeepalive_s = 0\n\n[[prompt]]".into(), "mqtt.keepalive_s"),
        ("[[prompt]]".into(), "[mqtt]\nembedded_port = 0\n\n[[prompt]]".into(), "mqtt.embedded_port"),
        ("[[prompt]]".into(), "[defaults]\nfps = 1000.0\n\n[[prompt]]".into(), "defaults.fps"),
        ("[[prompt]]".into(), "[defaults]\nfps = 1e308\n\n[[prompt]]".into(), "defaults.fps"),
        ("prompts = [\"caption\"]".into(), stream("window_seconds = 1e12"), "stream[0].window_seconds"),
        ("prompts = [\"caption\"]".into(), stream("fps = 30.0\nwindow_seconds = 7.0"), "stream[0].window_seconds"),
        ("prompts = [\"caption\"]".into(), stream("max_frame_pixels = 100000000"), "stream[0].max_frame_pixels"),
        // 180 frames of 4096×4096 would be 8.4 GiB of RGB.
        (
            "prompts = [\"caption\"]".into(),
            stream("fps = 30.0\nwindow_seconds = 6.0\nmax_frame_pixels = 16777216"),
            "stream[0].max_frame_pixels",
        ),
        ("prompts = [\"caption\"]".into(), stream("password_file = \"/dev/zero\""), "stream[0].password_file"),
        ("prompts = [\"caption\"]".into(), stream("password_file = \"/\""), "stream[0].password_file"),
        ("[[prompt]]".into(), "[mqtt]\nembedded_listen = \"0.0.0.0\"\n\n[[prompt]]".into(), "mqtt.embedded_listen"),
        ("[[prompt]]".into(), "[mqtt]\nusername = \"u\"\n\n[[prompt]]".into(), "mqtt.username"),
    ];
    for (from, to, key) in &cases {
        let text = MINIMAL.replacen(from.as_str(), to, 1);
        assert_ne!(text, MINIMAL, "case {key}: pattern {from:?} not found");
        let p = one_problem(&text);
        assert_eq!(&p.key, key, "case {}: {p:?}", &to[..to.len().min(80)]);
        assert!(p.line > 0 && p.col > 0, "case {key}: unlocated {p:?}");
    }
    // At the caps themselves: accepted.
    let at_caps = MINIMAL.replacen("prompts = [\"caption\"]", &stream("fps = 30.0\nwindow_seconds = 6.0"), 1);
    parse(&at_caps).unwrap();
}

#[test]
fn secret_files_are_read_bounded_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'a'; MAX_SECRET_BYTES as usize + 1]).unwrap();
    let e = read_bounded(&big, MAX_SECRET_BYTES).unwrap_err();
    assert!(e.to_string().contains("larger than"), "{e}");
    assert!(read_bounded(Path::new("/dev/zero"), MAX_SECRET_BYTES)
        .unwrap_err()
        .to_string()
        .contains("not a regular file"));
    assert!(read_bounded(dir.path(), 10).unwrap_err().to_string().contains("directory"));
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\nsecond line").unwrap();
    let text = MINIMAL.replacen(
        "prompts = [\"caption\"]",
        &format!("prompts = [\"caption\"]\npassword_file = {:?}", empty),
        1,
    );
    let p = one_problem(&text);
    assert!(p.message.contains("is empty"), "{p:?}");

    use std::os::unix::fs::PermissionsExt;
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let text =
        MINIMAL.replacen("prompts = [\"caption\"]", &format!("prompts = [\"caption\"]\npassword_file = {:?}", pw), 1);
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let warned = parse(&text).unwrap().warnings();
    assert!(warned.iter().any(|w| w.contains("readable by every user")), "{warned:?}");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!parse(&text).unwrap().warnings().iter().any(|w| w.contains("readable by every user")));
}

#[test]
fn config_files_are_read_bounded() {
    let e = Config::load(Path::new("/dev/zero")).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }) && e.to_string().contains("not a regular file"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.toml");
    std::fs::write(&big, format!("{MINIMAL}\n#{}\n", "x".repeat(MAX_CONFIG_BYTES as usize))).unwrap();
    assert!(Config::load(&big).unwrap_err().to_string().contains("larger than"));
}

#[test]
fn duplicate_names_point_at_the_second() {
    let text = format!("{MINIMAL}\n[[stream]]\nname = \"cam\"\nuri = \"/x.mp4\"\n");
    let p = one_problem(&text);
    assert_eq!(p.key, "stream[1].name");
    assert_eq!(p.line, 15);
    let text = MINIMAL.replace("[[stream]]", "[[prompt]]\nname = \"caption\"\ntext = \"Again.\"\n\n[[stream]]");
    let p = one_problem(&text);
    assert_eq!(p.key, "prompt[1].name");
    assert_eq!(p.line, 10);
}

#[test]
fn several_problems_are_all_reported() {
    let text = MINIMAL.replace("path = \"m\"", "path = \"m\"\ndevice = \"tpu\"\ntop_p = 2.0");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.problems().len(), 2);
    let shown = e.to_string();
    assert!(shown.contains("test.toml:4:10: model.device:"), "{shown}");
    assert!(shown.contains("test.toml:5:9: model.top_p:"), "{shown}");
}

#[test]
fn syntax_error_is_located() {
    let p = one_problem(&MINIMAL.replace("path = \"m\"", "path = \"m"));
    assert_eq!(p.line, 3);
    assert_eq!(p.key, "path");
}

#[test]
fn secrets_never_reach_messages() {
    let text = MINIMAL
        .replace("rtsp://cam.local/s", "rtsp://admin:hunter2@cam.local/s")
        .replace("name = \"cam\"", "name = \"c a m\"");
    let e = parse(&text).unwrap_err();
    assert!(!e.to_string().contains("hunter2"));
    let text = MINIMAL.replace("rtsp://cam.local/s", "gopher://admin:hunter2@cam.local/s");
    let e = parse(&text).unwrap_err();
    let shown = e.to_string();
    assert!(shown.contains("stream[0].uri"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("admin:***@"), "{shown}");
    // A type error whose message would quote the value.
    let text = MINIMAL.replace("prompts = [\"caption\"]", "prompts = \"rtsp://u:hunter2@h/x\"");
    let shown = parse(&text).unwrap_err().to_string();
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[test]
fn redact_uri_forms() {
    assert_eq!(redact_uri("rtsp://u:p@h:554/s"), "rtsp://u:***@h:554/s");
    assert_eq!(redact_uri("rtsp://u@h/s"), "rtsp://u@h/s");
    assert_eq!(redact_uri("rtsp://h/s"), "rtsp://h/s");
    assert_eq!(redact_uri("a rtsp://u:p%40x@h/ and mqtt://v:w@b:1883"), "a rtsp://u:***@h/ and mqtt://v:***@b:1883");
    assert_eq!(redact_uri("/plain/path.mp4"), "/plain/path.mp4");
}

#[test]
fn source_kinds() {
    assert_eq!(SourceKind::of("rtsps://h/x"), Ok(SourceKind::Rtsp));
    assert_eq!(SourceKind::of("https://h/x.mp4"), Ok(SourceKind::Http));
    assert_eq!(SourceKind::of("file:///a/b.mp4"), Ok(SourceKind::File));
    assert_eq!(SourceKind::of("clips/a.mp4"), Ok(SourceKind::File));
    assert_eq!(SourceKind::of("v4l2:///dev/video0"), Ok(SourceKind::V4l2));
    assert!(SourceKind::of("v4l2://").is_err());
    assert!(SourceKind::of("udp://h:5000").is_err());
}

#[test]
fn relative_paths_resolve_against_config_dir() {
    let c = Config::parse(MINIMAL, "x/test.toml", Path::new("/etc/vigil")).unwrap();
    assert_eq!(c.model_dir(), Some(PathBuf::from("/etc/vigil/m")));
    assert_eq!(c.resolve_path(Path::new("/abs")), PathBuf::from("/abs"));
}

#[test]
fn example_config_is_valid_and_complete() {
    let c = Config::parse(EXAMPLE_CONFIG, "example", Path::new(".")).unwrap();
    assert_eq!(c.streams.len(), 1);
    // Every key of every section appears in the example (commented or not).
    let defaults = serde_json::to_value(Config::parse(MINIMAL, "m", Path::new(".")).unwrap()).unwrap();
    for section in ["model", "pruning", "mqtt", "metrics", "engine", "defaults"] {
        for key in defaults[section].as_object().unwrap().keys() {
            let key = if key == "loop_" { "loop" } else { key.as_str() };
            assert!(EXAMPLE_CONFIG.contains(&format!("{key} =")), "example config lacks [{section}] {key}");
        }
    }
}

#[test]
fn did_you_mean_is_conservative() {
    assert_eq!(did_you_mean("fsp", ["fps", "uri"]), Some("fps"));
    assert_eq!(did_you_mean("window_second", ["window_seconds", "stride_seconds"]), Some("window_seconds"));
    assert_eq!(did_you_mean("zzz", ["fps", "uri"]), None);
}

#[test]
fn loaded_configs_resolve_against_an_absolute_dir() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("v.toml"), MINIMAL).unwrap();
    // A relative config path (as `vigil run --config config/demo.toml` gives).
    let cwd = std::env::current_dir().unwrap();
    let rel = pathdiff(dir.path(), &cwd).join("v.toml");
    let c = Config::load(&rel).unwrap();
    assert!(c.base_dir.is_absolute(), "{:?}", c.base_dir);
    let once = c.model_dir().unwrap();
    assert_eq!(c.resolve_path(&once), once, "resolving twice must not change the path");
    assert!(once.starts_with(std::path::absolute(&rel).unwrap().parent().unwrap()));
}

/// `to` relative to `from` (both absolute), via `..` as needed.
fn pathdiff(to: &Path, from: &Path) -> PathBuf {
    let (t, f): (Vec<_>, Vec<_>) = (to.components().collect(), from.components().collect());
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut p = PathBuf::new();
    for _ in common..f.len() {
        p.push("..");
    }
    for c in &t[common..] {
        p.push(c);
    }
    p
}

#[test]
fn a_gpu_gets_gpu_sized_batches_unless_the_file_sets_them() {
    // MINIMAL runs on the default device, cuda:0.
    let gpu = parse(MINIMAL).unwrap();
    assert_eq!(
        (gpu.engine.max_batch, gpu.engine.max_batch_tokens),
        (EngineConfig::GPU_MAX_BATCH, EngineConfig::GPU_MAX_BATCH_TOKENS)
    );
    let cpu = parse(&MINIMAL.replace("path = \"m\"", "path = \"m\"\ndevice = \"cpu\"")).unwrap();
    let d = EngineConfig::default();
    assert_eq!((cpu.engine.max_batch, cpu.engine.max_batch_tokens), (d.max_batch, d.max_batch_tokens));
    let set = parse(&format!("{MINIMAL}\n[engine]\nmax_batch = 4\n")).unwrap();
    assert_eq!((set.engine.max_batch, set.engine.max_batch_tokens), (4, EngineConfig::GPU_MAX_BATCH_TOKENS));
}
