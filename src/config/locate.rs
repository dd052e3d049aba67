//! Locating keys in the source: the file, line and column of a key path or a serde error.

use std::ops::Range;

use super::{did_you_mean, Problem};

/// One step of a key path such as `stream[1].prompts[0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PathSeg<'k> {
    Key(&'k str),
    Index(usize),
}

/// Split a dotted key path (`stream[1].prompts[0]`) into steps.
fn path_segs(key: &str) -> Vec<PathSeg<'_>> {
    let mut out = Vec::new();
    for part in key.split('.') {
        let mut pieces = part.split('[');
        if let Some(name) = pieces.next().filter(|n| !n.is_empty()) {
            out.push(PathSeg::Key(name));
        }
        for idx in pieces {
            if let Ok(i) = idx.trim_end_matches(']').parse() {
                out.push(PathSeg::Index(i));
            }
        }
    }
    out
}

pub(super) struct Locator<'a> {
    pub(super) text: &'a str,
    pub(super) doc: &'a toml_edit::Document<&'a str>,
}

impl Locator<'_> {
    /// Whether `key` is written in the file (rather than defaulted).
    pub(super) fn is_written(&self, key: &str) -> bool {
        let mut item = Some(self.doc.as_item());
        for seg in path_segs(key) {
            item = match seg {
                PathSeg::Key(k) => item.and_then(|it| it.get(k)),
                PathSeg::Index(i) => item.and_then(|it| it.get(i)),
            };
        }
        item.is_some()
    }

    /// Line and column of the value at `key`, or of its nearest ancestor that is written down
    /// (a default that was never written is reported at the table that would hold it).
    pub(super) fn find(&self, key: &str) -> (usize, usize) {
        let mut best: Option<Range<usize>> = None;
        let mut item: Option<&toml_edit::Item> = Some(self.doc.as_item());
        for seg in path_segs(key) {
            let Some(cur) = item else { break };
            let (next, key_span) = match seg {
                PathSeg::Key(k) => {
                    let key_span = match cur {
                        toml_edit::Item::Table(t) => t.key(k).and_then(|k| k.span()),
                        toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => t.key(k).and_then(|k| k.span()),
                        _ => None,
                    };
                    (cur.get(k), key_span)
                }
                PathSeg::Index(i) => (cur.get(i), None),
            };
            // Tables have no value span of their own; their header key stands in.
            if let Some(s) = next.and_then(|n| n.span()).or(key_span) {
                best = Some(s);
            }
            item = next;
        }
        match best {
            Some(r) => line_col(self.text, r.start),
            None => (1, 1),
        }
    }
}

/// 1-based line and character column of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, text[line_start..offset].chars().count() + 1)
}

/// Dotted key path of the innermost key/value whose span contains `offset`.
fn key_path_at(doc: &toml_edit::Document<&str>, offset: usize) -> Option<String> {
    fn walk(item: &toml_edit::Item, offset: usize, prefix: &str, best: &mut Option<String>) {
        match item {
            toml_edit::Item::Table(t) => {
                for (k, v) in t.iter() {
                    let path = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
                    let key_hit = t.key(k).and_then(|key| key.span()).is_some_and(|s| s.contains(&offset));
                    let val_hit = v.span().is_some_and(|s| s.start <= offset && offset <= s.end);
                    if key_hit || val_hit {
                        *best = Some(path.clone());
                    }
                    walk(v, offset, &path, best);
                }
            }
            toml_edit::Item::ArrayOfTables(a) => {
                for (i, t) in a.iter().enumerate() {
                    let path = format!("{prefix}[{i}]");
                    if t.span().is_some_and(|s| s.contains(&offset)) {
                        *best = Some(path.clone());
                    }
                    walk(&toml_edit::Item::Table(t.clone()), offset, &path, best);
                }
            }
            toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
                for (k, v) in t.iter() {
                    let path = format!("{prefix}.{k}");
                    if v.span().is_some_and(|s| s.start <= offset && offset <= s.end) {
                        *best = Some(path.clone());
                    }
                }
            }
            toml_edit::Item::Value(toml_edit::Value::Array(a)) => {
                for (i, v) in a.iter().enumerate() {
                    if v.span().is_some_and(|s| s.start <= offset && offset <= s.end) {
                        *best = Some(format!("{prefix}[{i}]"));
                    }
                }
            }
            _ => {}
        }
    }
    let mut best = None;
    walk(doc.as_item(), offset, "", &mut best);
    best
}

/// For syntax errors (no document): the `key =` written on the error's line, if any.
pub(super) fn key_path_in_line(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let end = text[offset..].find('\n').map(|i| offset + i).unwrap_or(text.len());
    let line = &text[start..end];
    match line.split_once('=') {
        Some((k, _)) if !k.trim().is_empty() && !k.trim_start().starts_with('#') => k.trim().to_string(),
        _ => line.trim().trim_start_matches('[').trim_end_matches(']').trim().to_string(),
    }
}

/// Turn a serde/toml deserialisation error into a located problem, with "did you mean".
pub(super) fn serde_problem(text: &str, doc: &toml_edit::Document<&str>, e: &toml::de::Error) -> Problem {
    let span = e.span();
    let (line, col) = span.as_ref().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
    let mut message = e.message().trim().to_string();
    let mut key = span.as_ref().and_then(|s| key_path_at(doc, s.start)).unwrap_or_else(|| "<root>".into());

    // serde: "unknown field `fsp`, expected one of `fps`, `window_seconds`" / "... expected `x`"
    //        "unknown variant `x`, expected one of ..."
    for what in ["unknown field", "unknown variant"] {
        if let Some(rest) = message.strip_prefix(&format!("{what} `")) {
            if let Some((word, expected)) = rest.split_once('`') {
                let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
                let word = word.to_string();
                if what == "unknown field" {
                    // The span covers the table; point at the offending key itself.
                    if let Some((l, c, k)) = find_key_in_span(text, doc, span.clone(), &word) {
                        return Problem { line: l, col: c, key: k, message: unknown_key_message(&word, &candidates) };
                    }
                    if !key.ends_with(&word) {
                        key = if key == "<root>" { word.clone() } else { format!("{key}.{word}") };
                    }
                    message = unknown_key_message(&word, &candidates);
                } else if let Some(best) = did_you_mean(&word, candidates.iter().copied()) {
                    message.push_str(&format!(" (did you mean `{best}`?)"));
                }
            }
        }
    }
    if message.starts_with("missing field") {
        // A missing field is reported at the table that lacks it.
        if let Some(field) = message.split('`').nth(1) {
            if !key.ends_with(field) {
                message = format!("required key `{field}` is missing");
            }
        }
    }
    Problem { line, col, key, message }
}

fn unknown_key_message(word: &str, candidates: &[&str]) -> String {
    let mut m = format!("unknown key `{word}`");
    if let Some(best) = did_you_mean(word, candidates.iter().copied()) {
        m.push_str(&format!(" (did you mean `{best}`?)"));
    } else if !candidates.is_empty() {
        m.push_str(&format!("; expected one of {}", candidates.join(", ")));
    }
    m
}

/// Find the key named `word` whose span lies inside `span` (the enclosing table).
fn find_key_in_span(
    text: &str,
    doc: &toml_edit::Document<&str>,
    span: Option<Range<usize>>,
    word: &str,
) -> Option<(usize, usize, String)> {
    fn walk(
        item: &toml_edit::Item,
        prefix: &str,
        word: &str,
        span: &Option<Range<usize>>,
        out: &mut Vec<(usize, String)>,
    ) {
        let visit_table = |t: &toml_edit::Table, prefix: &str, out: &mut Vec<(usize, String)>| {
            for (k, v) in t.iter() {
                let path = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
                if k == word {
                    if let Some(s) = t.key(k).and_then(|key| key.span()) {
                        if span.as_ref().is_none_or(|sp| sp.start <= s.start && s.start <= sp.end) {
                            out.push((s.start, path.clone()));
                        }
                    }
                }
                walk(v, &path, word, span, out);
            }
        };
        match item {
            toml_edit::Item::Table(t) => visit_table(t, prefix, out),
            toml_edit::Item::ArrayOfTables(a) => {
                for (i, t) in a.iter().enumerate() {
                    visit_table(t, &format!("{prefix}[{i}]"), out);
                }
            }
            toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
                for (k, _) in t.iter() {
                    if k == word {
                        if let Some(s) = t.key(k).and_then(|key| key.span()) {
                            out.push((s.start, format!("{prefix}.{k}")));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(doc.as_item(), "", word, &span, &mut out);
    out.sort();
    let (off, path) = out.into_iter().next()?;
    let (l, c) = line_col(text, off);
    Some((l, c, path))
}
