//! Turning generated text into typed answers, per prompt kind (`caption`, `alert`, `json`).
//! (Rising edges of alert answers are tracked where they are published: `publish::Publisher`.)

use crate::config::PromptKind;

/// The typed value of an answer. `None` with a `parse_error` when the text did not parse.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedAnswer {
    pub value: Option<serde_json::Value>,
    pub parse_error: Option<String>,
}

/// Parse `text` as the prompt kind asks: captions are text (value null, no error); alerts take
/// the first word (yes/true/no/false, any case); json takes the first JSON object in the text.
pub fn parse_answer(kind: PromptKind, text: &str) -> ParsedAnswer {
    let ok = |v| ParsedAnswer { value: Some(v), parse_error: None };
    let err = |e: String| ParsedAnswer { value: None, parse_error: Some(e) };
    match kind {
        PromptKind::Caption => ParsedAnswer { value: None, parse_error: None },
        PromptKind::Alert => match parse_yes_no(text) {
            Some(b) => ok(serde_json::Value::Bool(b)),
            None => err(format!("expected yes/no/true/false as the first word, got {:?}", first_word(text))),
        },
        PromptKind::Json => match first_json_object(text) {
            Some(v) => ok(v),
            None => err("no JSON object found in the answer".into()),
        },
    }
}

fn first_word(text: &str) -> &str {
    text.split(|c: char| c.is_whitespace() || matches!(c, ',' | '.' | '!' | '?' | ':' | ';'))
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
        .find(|w| !w.is_empty())
        .unwrap_or("")
}

/// `yes`/`true` → true, `no`/`false` → false, from the answer's first word.
pub fn parse_yes_no(text: &str) -> Option<bool> {
    match first_word(text).to_ascii_lowercase().as_str() {
        "yes" | "true" => Some(true),
        "no" | "false" => Some(false),
        _ => None,
    }
}

/// The first complete JSON object in `text` (models often wrap it in prose or ``` fences).
pub fn first_json_object(text: &str) -> Option<serde_json::Value> {
    let mut from = 0;
    while let Some(i) = text[from..].find('{') {
        let start = from + i;
        let mut stream = serde_json::Deserializer::from_str(&text[start..]).into_iter::<serde_json::Value>();
        if let Some(Ok(v @ serde_json::Value::Object(_))) = stream.next() {
            return Some(v);
        }
        from = start + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn alert_answers_from_real_looking_text() {
        let table: &[(&str, Option<bool>)] = &[
            ("Yes", Some(true)),
            ("yes.", Some(true)),
            ("Yes, a person is standing at the door.", Some(true)),
            ("  YES!", Some(true)),
            ("True", Some(true)),
            ("\"yes\"", Some(true)),
            ("No", Some(false)),
            ("no, the scene is empty", Some(false)),
            ("False.", Some(false)),
            ("NO", Some(false)),
            ("**No**", Some(false)),
            ("There is a person.", None),
            ("Yesterday a car passed", None),
            ("Nobody is there", None),
            ("", None),
            ("I cannot tell.", None),
        ];
        for (text, want) in table {
            let got = parse_answer(PromptKind::Alert, text);
            assert_eq!(got.value.as_ref().and_then(|v| v.as_bool()), *want, "{text:?}");
            assert_eq!(got.parse_error.is_some(), want.is_none(), "{text:?}");
        }
    }

    #[test]
    fn json_answers_from_real_looking_text() {
        let table: &[(&str, Option<serde_json::Value>)] = &[
            (r#"{"people": 2, "vehicles": 0}"#, Some(json!({"people": 2, "vehicles": 0}))),
            ("```json\n{\"people\": 1}\n```", Some(json!({"people": 1}))),
            ("Here is the answer: {\"door\": \"open\"} as requested.", Some(json!({"door": "open"}))),
            ("{broken {\"ok\": true}", Some(json!({"ok": true}))),
            (r#"{"nested": {"a": [1, 2]}} trailing {"second": 1}"#, Some(json!({"nested": {"a": [1, 2]}}))),
            ("[1, 2, 3]", None),
            ("{\"unterminated\": 1", None),
            ("no json here", None),
        ];
        for (text, want) in table {
            let got = parse_answer(PromptKind::Json, text);
            assert_eq!(&got.value, want, "{text:?}");
            assert_eq!(got.parse_error.is_some(), want.is_none(), "{text:?}");
        }
    }

    #[test]
    fn captions_are_text_only() {
        let got = parse_answer(PromptKind::Caption, "A man walks a dog.");
        assert_eq!(got, ParsedAnswer { value: None, parse_error: None });
    }
}
