//! Secrets: credentials in URIs and the contents of password files never leave this module.

/// Replace the password in a URI's userinfo with `***` (`rtsp://user:***@host/...`).
///
/// Works on anything that looks like `scheme://user:pass@`, so it is safe on strings that are
/// not valid URLs (e.g. inside error messages).
pub fn redact_uri(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first '/', whitespace or quote; the userinfo at its last '@'.
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'' || c == '`')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Secret substrings found in a config text (URI passwords), to scrub from any message.
pub(super) fn secrets_in(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let tail = &rest[i + 3..];
        let end = tail.find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'').unwrap_or(tail.len());
        let authority = &tail[..end];
        if let Some(at) = authority.rfind('@') {
            if let Some(colon) = authority[..at].find(':') {
                let pw = &authority[colon + 1..at];
                if !pw.is_empty() {
                    found.push(pw.to_string());
                    // Percent-decoded form too, in case a message shows the decoded value.
                    if let Ok(dec) = url::Url::parse(&format!("x://u:{pw}@h")) {
                        if let Some(p) = dec.password() {
                            let d = percent_decode(p);
                            if d != pw {
                                found.push(d);
                            }
                        }
                    }
                }
            }
        }
        rest = &tail[end..];
    }
    found.sort_by_key(|s| std::cmp::Reverse(s.len()));
    found.dedup();
    found
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn scrub(message: &str, secrets: &[String]) -> String {
    let mut m = redact_uri(message);
    for s in secrets {
        if s.len() >= 2 {
            m = m.replace(s.as_str(), "***");
        }
    }
    m
}
