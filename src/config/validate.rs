//! Loading: read, parse and check a config, every problem located in the file.

use super::locate::{key_path_in_line, line_col, serde_problem, Locator};
use super::redact::{scrub, secrets_in};
use super::*;

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_bounded(path, MAX_CONFIG_BYTES)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        // Absolute, so that a path resolved once stays the same if resolved again.
        let base = std::path::absolute(&base).unwrap_or(base);
        Self::parse(&text, &path.display().to_string(), &base)
    }

    /// Parse and validate config text; `file` names it in messages, `base_dir` anchors relative
    /// paths.
    pub fn parse(text: &str, file: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let secrets = secrets_in(text);
        let invalid = |problems: Vec<Problem>| ConfigError::Invalid {
            file: file.to_string(),
            problems: problems
                .into_iter()
                .map(|p| Problem { message: scrub(&p.message, &secrets), key: scrub(&p.key, &secrets), ..p })
                .collect(),
        };

        let doc = match toml_edit::Document::parse(text) {
            Ok(doc) => doc,
            Err(e) => {
                let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
                let key = e.span().map(|s| key_path_in_line(text, s.start)).unwrap_or_else(|| "<syntax>".into());
                return Err(invalid(vec![Problem {
                    line,
                    col,
                    key,
                    message: format!("TOML syntax error: {}", e.message().trim()),
                }]));
            }
        };

        let file_cfg: ConfigFile = match toml::from_str(text) {
            Ok(c) => c,
            Err(e) => return Err(invalid(vec![serde_problem(text, &doc, &e)])),
        };

        let locator = Locator { text, doc: &doc };
        let (model, device_error) = file_cfg.model.resolve();
        let mut cfg = Config {
            streams: file_cfg.stream.into_iter().map(|s| s.resolve(&file_cfg.defaults)).collect(),
            model,
            pruning: file_cfg.pruning,
            mqtt: file_cfg.mqtt,
            metrics: file_cfg.metrics,
            engine: file_cfg.engine,
            defaults: file_cfg.defaults,
            prompts: file_cfg.prompt,
            base_dir: base_dir.to_path_buf(),
        };
        // On a GPU, batches as large as a GPU takes, unless the file says otherwise.
        if matches!(cfg.model.device, Device::Cuda(_)) {
            let given = |key: &str| doc.get("engine").and_then(|e| e.get(key)).is_some();
            if !given("max_batch") {
                cfg.engine.max_batch = EngineConfig::GPU_MAX_BATCH;
            }
            if !given("max_batch_tokens") {
                cfg.engine.max_batch_tokens = EngineConfig::GPU_MAX_BATCH_TOKENS;
            }
        }
        let problems = cfg.validate(&locator, device_error.as_deref());
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(invalid(problems))
        }
    }

    /// Every problem of the config; `device_error` is why `model.device` did not parse.
    fn validate(&self, loc: &Locator, device_error: Option<&str>) -> Vec<Problem> {
        let mut v = Validator { loc, problems: Vec::new() };
        let m = &self.model;

        match (&m.path, &m.repo) {
            (None, None) => v.fail("model", "set one of model.path or model.repo"),
            (Some(_), Some(_)) => v.fail("model.repo", "set only one of model.path or model.repo"),
            _ => {}
        }
        if let Some(e) = device_error {
            v.fail("model.device", e);
        }
        if m.max_new_tokens == 0 {
            v.fail("model.max_new_tokens", "must be at least 1");
        }
        if !(m.temperature >= 0.0 && m.temperature.is_finite()) {
            v.fail("model.temperature", "must be >= 0 (0 = greedy)");
        }
        if !(m.top_p > 0.0 && m.top_p <= 1.0) {
            v.fail("model.top_p", "must be in (0, 1]");
        }

        let p = &self.pruning;
        if !(p.threshold >= 0.0 && p.threshold.is_finite()) {
            v.fail("pruning.threshold", "must be >= 0 (mean |Δpixel| on 0-255)");
        }
        if p.min_tokens_per_frame == 0 {
            v.fail("pruning.min_tokens_per_frame", "must be at least 1");
        }

        self.validate_mqtt(&mut v);

        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            v.fail(
                "metrics.listen",
                &format!("{:?} is not host:port (e.g. \"127.0.0.1:9464\"; \"\" disables)", self.metrics.listen),
            );
        }

        let e = &self.engine;
        for (key, ok) in [
            ("max_batch", e.max_batch >= 1),
            ("max_batch_tokens", e.max_batch_tokens >= 1),
            ("queue_capacity", e.queue_capacity >= 1),
        ] {
            if !ok {
                v.fail(&format!("engine.{key}"), "must be at least 1");
            }
        }
        for (key, val) in [("max_queue_age_s", e.max_queue_age_s), ("shutdown_timeout_s", e.shutdown_timeout_s)] {
            if !(val > 0.0 && val.is_finite()) {
                v.fail(&format!("engine.{key}"), "must be > 0");
            }
        }

        self.validate_stream_settings(&mut v, "defaults", &self.defaults);
        let defaults_failed: HashSet<String> =
            v.problems.iter().filter_map(|p| p.key.strip_prefix("defaults.").map(String::from)).collect();

        let mut prompt_names = HashSet::new();
        for (i, pr) in self.prompts.iter().enumerate() {
            let key = |k: &str| format!("prompt[{i}].{k}");
            if let Err(e) = check_name(&pr.name) {
                v.fail(&key("name"), &e);
            } else if RESERVED_PROMPT_NAMES.contains(&pr.name.as_str()) {
                v.fail(
                    &key("name"),
                    &format!(
                        "{:?} is reserved: it would collide with the topic <prefix>/<stream>/{}",
                        pr.name, pr.name
                    ),
                );
            } else if !prompt_names.insert(pr.name.as_str()) {
                v.fail(&key("name"), &format!("duplicate prompt name {:?}", pr.name));
            }
            if pr.text.trim().is_empty() {
                v.fail(&key("text"), "must not be empty");
            } else if pr.text.chars().count() > MAX_PROMPT_CHARS {
                v.fail(
                    &key("text"),
                    &format!("is {} characters long; at most {MAX_PROMPT_CHARS}", pr.text.chars().count()),
                );
            }
            if pr.every == 0 {
                v.fail(&key("every"), "must be at least 1 (1 = every window)");
            }
            if pr.max_new_tokens == Some(0) {
                v.fail(&key("max_new_tokens"), "must be at least 1");
            }
            let event_keys = [
                ("confirm_windows", pr.confirm_windows.is_some()),
                ("clear_windows", pr.clear_windows.is_some()),
                ("cooldown_s", pr.cooldown_s.is_some()),
                ("event_updates", pr.event_updates.is_some()),
            ];
            for (k, set) in event_keys {
                if set && pr.kind != PromptKind::Alert {
                    v.fail(&key(k), "applies to alert prompts only (kind = \"alert\")");
                }
            }
            for (k, n) in [("confirm_windows", pr.confirm_windows), ("clear_windows", pr.clear_windows)] {
                if n == Some(0) {
                    v.fail(&key(k), "must be at least 1");
                }
            }
            if let Err(e) = crate::schedule::Schedule::parse(&pr.active, &pr.days) {
                let k = if e.contains("not a day") { "days" } else { "active" };
                v.fail(&key(k), &e);
            }
            if pr.cooldown_s.is_some_and(|c| !(0.0..=86_400.0).contains(&c)) {
                v.fail(&key("cooldown_s"), "must be between 0 and 86400 (a day)");
            }
        }

        let mut stream_names = HashSet::new();
        for (i, s) in self.streams.iter().enumerate() {
            let key = |k: &str| format!("stream[{i}].{k}");
            if let Err(e) = check_name(&s.name) {
                v.fail(&key("name"), &e);
            } else if !stream_names.insert(s.name.as_str()) {
                v.fail(&key("name"), &format!("duplicate stream name {:?}", s.name));
            }
            if let Err(e) = SourceKind::of(&s.uri) {
                v.fail(&key("uri"), &format!("{:?} {e}", redact_uri(&s.uri)));
            }
            for (j, name) in s.prompts.iter().enumerate() {
                if !prompt_names.contains(name.as_str()) {
                    let defined: Vec<&str> = self.prompts.iter().map(|p| p.name.as_str()).collect();
                    let mut msg = format!("names undefined prompt {name:?}");
                    if let Some(best) = did_you_mean(name, defined.iter().copied()) {
                        msg.push_str(&format!(" (did you mean {best:?}?)"));
                    } else if defined.is_empty() {
                        msg.push_str(" (no [[prompt]] is defined)");
                    }
                    // Point at the offending element, report the key the user wrote.
                    v.fail_at(&format!("stream[{i}].prompts[{j}]"), &key("prompts"), &msg);
                }
            }
            if let Some(pf) = &s.password_file {
                self.check_secret(&mut v, &key("password_file"), pf);
            }
            // A bad value inherited from [defaults] is reported once, there, not again per stream.
            let before = v.problems.len();
            self.validate_stream_settings(&mut v, &format!("stream[{i}]"), &s.settings);
            let found: Vec<Problem> = v.problems.drain(before..).collect();
            for p in found {
                let field = p.key.rsplit('.').next().unwrap_or_default().to_string();
                if v.loc.is_written(&p.key) || !defaults_failed.contains(&field) {
                    v.problems.push(p);
                }
            }
        }
        v.problems
    }

    fn validate_mqtt(&self, v: &mut Validator) {
        let q = &self.mqtt;
        if q.broker != "embedded" && !q.broker.contains("://") {
            v.fail(
                "mqtt.broker",
                &format!("{:?} is not \"embedded\" or a broker URL like mqtt://host:1883", redact_uri(&q.broker)),
            );
        } else if q.broker != "embedded" {
            match url::Url::parse(&q.broker) {
                Ok(u)
                    if matches!(u.scheme(), "mqtt" | "mqtts" | "tcp" | "ssl")
                        && u.host_str().is_some_and(|h| !h.is_empty()) => {}
                Ok(u) if !matches!(u.scheme(), "mqtt" | "mqtts" | "tcp" | "ssl") => v.fail(
                    "mqtt.broker",
                    &format!(
                        "unsupported scheme {:?} (expected \"embedded\", mqtt://host:1883 or mqtts://host:8883)",
                        u.scheme()
                    ),
                ),
                Ok(_) => v.fail("mqtt.broker", "has no host"),
                Err(e) => v.fail(
                    "mqtt.broker",
                    &format!(
                        "{:?} is not \"embedded\" or a broker URL like mqtt://host:1883 ({e})",
                        redact_uri(&q.broker)
                    ),
                ),
            }
        }
        if q.qos > 2 {
            v.fail("mqtt.qos", &format!("must be 0, 1 or 2 (got {})", q.qos));
        }
        if q.topic_prefix.is_empty()
            || q.topic_prefix.contains(['+', '#'])
            || q.topic_prefix.starts_with('/')
            || q.topic_prefix.ends_with('/')
        {
            v.fail("mqtt.topic_prefix", "must be non-empty, without MQTT wildcards (+, #) or a leading/trailing '/'");
        } else if q.topic_prefix.chars().count() > MAX_TOPIC_PREFIX_CHARS {
            v.fail("mqtt.topic_prefix", &format!("is longer than {MAX_TOPIC_PREFIX_CHARS} characters"));
        }
        if q.client_id.is_empty() {
            v.fail("mqtt.client_id", "must not be empty");
        } else if q.client_id.chars().count() > MAX_CLIENT_ID_CHARS {
            v.fail("mqtt.client_id", &format!("is longer than {MAX_CLIENT_ID_CHARS} characters"));
        }
        if q.keepalive_s == 0 {
            v.fail("mqtt.keepalive_s", "must be at least 1 (without keep-alive a dead broker goes unnoticed)");
        } else if q.keepalive_s > u64::from(u16::MAX) {
            v.fail("mqtt.keepalive_s", &format!("must be at most {} (MQTT's limit)", u16::MAX));
        }
        if q.broker == "embedded" && q.embedded_port == 0 {
            v.fail("mqtt.embedded_port", "must be a port number (1-65535); 0 would pick a random one nobody knows");
        }
        if q.outbox_capacity == 0 {
            v.fail("mqtt.outbox_capacity", "must be at least 1");
        }
        if let Some(pf) = &q.password_file {
            self.check_secret(v, "mqtt.password_file", pf);
            if q.username.is_none() {
                v.fail("mqtt.password_file", "needs mqtt.username");
            }
        }
        for key in ["ca_file", "cert_file", "key_file"] {
            let f = match key {
                "ca_file" => &q.ca_file,
                "cert_file" => &q.cert_file,
                _ => &q.key_file,
            };
            if let Some(f) = f {
                self.check_readable(v, &format!("mqtt.{key}"), f);
            }
        }
        if q.cert_file.is_some() != q.key_file.is_some() {
            v.fail("mqtt.cert_file", "cert_file and key_file go together");
        }
        if let Some(listen) = &q.embedded_listen {
            match listen.parse::<std::net::IpAddr>() {
                Err(_) => v.fail("mqtt.embedded_listen", &format!("{listen:?} is not an IP address")),
                Ok(ip) if q.broker == "embedded" && !ip.is_loopback() && q.username.is_none() => v.fail(
                    "mqtt.embedded_listen",
                    &format!(
                        "the embedded broker on {ip} would be open to the network: set mqtt.username and \
                         mqtt.password_file (it then requires them of every client)"
                    ),
                ),
                Ok(_) => {}
            }
        }
        if q.broker == "embedded" && q.username.is_some() && q.password_file.is_none() {
            v.fail("mqtt.username", "the embedded broker needs mqtt.password_file with it");
        }
    }

    fn check_readable(&self, v: &mut Validator, key: &str, p: &Path) {
        let full = self.resolve_path(p);
        if let Err(e) = std::fs::File::open(&full) {
            v.fail(key, &format!("cannot read {}: {e}", full.display()));
        }
    }

    /// A password file: regular, small, with a non-empty first line.
    fn check_secret(&self, v: &mut Validator, key: &str, p: &Path) {
        let full = self.resolve_path(p);
        match read_bounded(&full, MAX_SECRET_BYTES) {
            Err(e) => v.fail(key, &format!("cannot read {}: {e}", full.display())),
            Ok(text) if text.lines().next().unwrap_or("").is_empty() => {
                v.fail(key, &format!("{}: the first line (the password) is empty", full.display()))
            }
            Ok(_) => {}
        }
    }

    /// Settings of `[defaults]` or of one stream; `key` is the table (`defaults`, `stream[2]`).
    fn validate_stream_settings(&self, v: &mut Validator, key: &str, s: &StreamDefaults) {
        let name = |k: &str| format!("{key}.{k}");
        if !(s.fps > 0.0 && s.fps <= MAX_FPS) {
            v.fail(&name("fps"), &format!("must be > 0 and at most {MAX_FPS} (got {})", s.fps));
        } else if !(s.window_seconds.is_finite() && s.window_seconds * s.fps >= 1.0 - 1e-9) {
            v.fail(
                &name("window_seconds"),
                &format!(
                    "window of {} s holds less than one frame at {} fps (needs >= {} s)",
                    s.window_seconds,
                    s.fps,
                    1.0 / s.fps
                ),
            );
        } else if s.window_seconds * s.fps > MAX_WINDOW_FRAMES + 1e-9 {
            v.fail(
                &name("window_seconds"),
                &format!(
                    "window of {} s holds {:.0} frames at {} fps; at most {MAX_WINDOW_FRAMES} (needs <= {} s)",
                    s.window_seconds,
                    s.window_seconds * s.fps,
                    s.fps,
                    MAX_WINDOW_FRAMES / s.fps
                ),
            );
        } else if s.max_frame_pixels <= MAX_FRAME_PIXELS {
            let frames = (s.window_seconds * s.fps + 1e-9).floor() as u64;
            let bytes = frames * s.max_frame_pixels * 3;
            if bytes > MAX_WINDOW_BYTES {
                v.fail(
                    &name("max_frame_pixels"),
                    &format!(
                        "{frames} frames of {} pixels make {} MiB of RGB per window; at most {} MiB (fewer frames or pixels)",
                        s.max_frame_pixels,
                        bytes >> 20,
                        MAX_WINDOW_BYTES >> 20
                    ),
                );
            }
        }
        if !(s.stride_seconds > 0.0 && s.stride_seconds.is_finite()) {
            v.fail(&name("stride_seconds"), &format!("must be > 0 (got {})", s.stride_seconds));
        }
        // One 28×28 merged patch is the smallest frame the model can take.
        if s.max_frame_pixels < 28 * 28 {
            v.fail(&name("max_frame_pixels"), "must be at least 784 (28×28)");
        } else if s.max_frame_pixels > MAX_FRAME_PIXELS {
            v.fail(&name("max_frame_pixels"), &format!("must be at most {MAX_FRAME_PIXELS} (4096×4096)"));
        }
        if !(1..=100).contains(&s.snapshot_quality) {
            v.fail(&name("snapshot_quality"), "must be between 1 and 100");
        }
        if s.snapshot_max_pixels.is_some_and(|p| !(784..=MAX_FRAME_PIXELS).contains(&p)) {
            v.fail(&name("snapshot_max_pixels"), &format!("must be between 784 and {MAX_FRAME_PIXELS}"));
        }
        if s.snapshot_keep == 0 {
            v.fail(&name("snapshot_keep"), "must be at least 1");
        }
        if !(0.0..=1.0).contains(&s.min_changed_fraction) {
            v.fail(&name("min_changed_fraction"), "must be between 0 and 1");
        }
        if !(s.reconnect_min_s > 0.0 && s.reconnect_min_s.is_finite()) {
            v.fail(&name("reconnect_min_s"), "must be > 0");
        } else if s.reconnect_max_s.partial_cmp(&s.reconnect_min_s).is_none_or(|o| o.is_lt()) {
            v.fail(&name("reconnect_max_s"), "must be >= reconnect_min_s");
        }
    }
}

/// Stream and prompt names become MQTT topic levels and metric labels.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(format!("is {} characters long; at most {MAX_NAME_CHARS}", name.chars().count()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!(
            "{name:?} contains {c:?}: use letters, digits, '-', '_' or '.' (it becomes an MQTT topic level)"
        ));
    }
    Ok(())
}

/// The closest candidate within a small edit distance.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4) && *d < c.len().max(word.len()))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

struct Validator<'a, 'b> {
    loc: &'a Locator<'b>,
    problems: Vec<Problem>,
}

impl Validator<'_, '_> {
    /// Report a problem with `key`, located where the file writes it.
    fn fail(&mut self, key: &str, message: &str) {
        self.fail_at(key, key, message);
    }

    /// Report a problem with `key`, located at `locate` (a more precise path inside it).
    fn fail_at(&mut self, locate: &str, key: &str, message: &str) {
        let (line, col) = self.loc.find(locate);
        self.problems.push(Problem { line, col, key: key.to_string(), message: message.to_string() });
    }
}
