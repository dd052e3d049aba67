//! A small JSON Schema (2020-12 subset) validator for the committed payload schemas.
//!
//! Why not the `jsonschema` crate: even with default features off it brings regex, fancy-regex,
//! referencing, idna, email and uuid parsers — minutes of build on CI's 2 cores for the dozen
//! keywords our schemas use. This validator REFUSES any keyword it does not implement, so a
//! schema can never silently be checked less strictly than it reads.

use serde_json::Value;

/// Validate `v` against `schema` (with `root` for `$ref`s); returns every violation.
pub fn validate(schema: &Value, v: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    check(schema, schema, v, "$", &mut errs);
    errs
}

/// Load `tests/schema/<name>` from the crate root.
pub fn load(name: &str) -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schema").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).expect("schema file")).expect("schema JSON")
}

/// Panic with every violation if `v` does not match.
pub fn assert_valid(schema: &Value, v: &Value) {
    let errs = validate(schema, v);
    assert!(errs.is_empty(), "payload violates {}:\n{}\npayload: {v}", schema["title"], errs.join("\n"));
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "number" => v.is_number(),
        "integer" => v.as_i64().is_some() || v.as_u64().is_some(),
        other => panic!("schema: unknown type {other:?}"),
    }
}

/// RFC 3339 date-time, strictly `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn is_date_time(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    if b.len() < 20 || !digits(0..4) || b[4] != b'-' || !digits(5..7) || b[7] != b'-' || !digits(8..10) {
        return false;
    }
    if !(b[10] == b'T' || b[10] == b't')
        || !digits(11..13)
        || b[13] != b':'
        || !digits(14..16)
        || b[16] != b':'
        || !digits(17..19)
    {
        return false;
    }
    let num = |r: std::ops::Range<usize>| s[r].parse::<u32>().unwrap_or(99);
    if !(1..=12).contains(&num(5..7))
        || !(1..=31).contains(&num(8..10))
        || num(11..13) > 23
        || num(14..16) > 59
        || num(17..19) > 60
    {
        return false;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match &s[i..] {
        "Z" | "z" => true,
        tz => tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) && tz.as_bytes()[3] == b':',
    }
}

fn check(root: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    let Some(obj) = schema.as_object() else {
        if schema == &Value::Bool(false) {
            errs.push(format!("{at}: not allowed"));
        }
        return;
    };
    for (k, s) in obj {
        match k.as_str() {
            "$schema" | "$id" | "title" | "description" | "$comment" | "$defs" | "examples" => {}
            "$ref" => {
                let r = s.as_str().expect("$ref string");
                let name = r.strip_prefix("#/$defs/").unwrap_or_else(|| panic!("schema: only #/$defs/ refs, got {r}"));
                check(root, &root["$defs"][name], v, at, errs);
            }
            "type" => {
                let ok = match s {
                    Value::String(t) => type_ok(t, v),
                    Value::Array(ts) => ts.iter().any(|t| type_ok(t.as_str().expect("type name"), v)),
                    _ => panic!("schema: bad type"),
                };
                if !ok {
                    errs.push(format!("{at}: expected type {s}, got {v}"));
                }
            }
            "const" => {
                if s != v {
                    errs.push(format!("{at}: expected {s}, got {v}"));
                }
            }
            "enum" => {
                if !s.as_array().expect("enum array").contains(v) {
                    errs.push(format!("{at}: {v} not in {s}"));
                }
            }
            "minimum" | "maximum" | "exclusiveMinimum" => {
                if let (Some(x), Some(lim)) = (v.as_f64(), s.as_f64()) {
                    let ok = match k.as_str() {
                        "minimum" => x >= lim,
                        "maximum" => x <= lim,
                        _ => x > lim,
                    };
                    if !ok {
                        errs.push(format!("{at}: {x} violates {k} {lim}"));
                    }
                }
            }
            "minLength" => {
                if let Some(t) = v.as_str() {
                    if (t.chars().count() as u64) < s.as_u64().expect("minLength") {
                        errs.push(format!("{at}: shorter than {s}"));
                    }
                }
            }
            "format" => {
                assert_eq!(s, "date-time", "schema: only format date-time is implemented");
                if let Some(t) = v.as_str() {
                    if !is_date_time(t) {
                        errs.push(format!("{at}: {t:?} is not an RFC 3339 date-time"));
                    }
                }
            }
            "required" => {
                if let Some(o) = v.as_object() {
                    for r in s.as_array().expect("required array") {
                        let r = r.as_str().expect("required name");
                        if !o.contains_key(r) {
                            errs.push(format!("{at}: missing required {r:?}"));
                        }
                    }
                }
            }
            "properties" => {
                if let Some(o) = v.as_object() {
                    for (name, sub) in s.as_object().expect("properties object") {
                        if let Some(x) = o.get(name) {
                            check(root, sub, x, &format!("{at}.{name}"), errs);
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(o) = v.as_object() {
                    let known = obj.get("properties").and_then(Value::as_object);
                    for (name, x) in o {
                        if known.is_some_and(|p| p.contains_key(name)) {
                            continue;
                        }
                        match s {
                            Value::Bool(false) => errs.push(format!("{at}: unexpected property {name:?}")),
                            Value::Bool(true) => {}
                            sub => check(root, sub, x, &format!("{at}.{name}"), errs),
                        }
                    }
                }
            }
            other => panic!("schema keyword {other:?} is not implemented by tests/common/schema.rs"),
        }
    }
}

#[test]
fn validator_rejects_what_it_should() {
    let schema = load("answer.v1.schema.json");
    assert!(!validate(&schema, &serde_json::json!({})).is_empty());
    let s = serde_json::json!({"type": "object", "required": ["a"], "additionalProperties": false,
        "properties": {"a": {"type": "integer", "minimum": 1}, "t": {"type": "string", "format": "date-time"}}});
    assert!(validate(&s, &serde_json::json!({"a": 1, "t": "2026-11-24T20:31:05.123Z"})).is_empty());
    assert_eq!(validate(&s, &serde_json::json!({"a": 0})).len(), 1);
    assert_eq!(validate(&s, &serde_json::json!({"a": 1.5})).len(), 1);
    assert_eq!(validate(&s, &serde_json::json!({"a": 1, "b": 2})).len(), 1);
    assert_eq!(validate(&s, &serde_json::json!({"a": 1, "t": "2026-13-24T20:31:05Z"})).len(), 1);
    assert_eq!(validate(&s, &serde_json::json!({"a": 1, "t": "2026-11-24 20:31:05"})).len(), 1);
}
