//! Chat templates rendered with minijinja the way transformers renders them with jinja2.
//!
//! Source of truth: `transformers/utils/chat_template_utils.py` (`_compile_jinja_template`,
//! `render_jinja_template`): an `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True, extensions=[loopcontrols])`, a `tojson` filter built on `json.dumps`
//! (`ensure_ascii=False`), a `raise_exception` global, and the tokenizer's special tokens
//! (`bos_token`, `eos_token`, `pad_token`, ...) plus `messages` / `add_generation_prompt` as variables.

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use super::ProcessorError;

/// One content part of a message: `{"type": "image"}`, `{"type": "video"}` or
/// `{"type": "text", "text": ...}` — the structure transformers passes to the template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ContentPart {
    Image,
    Video,
    Text { text: String },
}

/// Message content: a plain string or a list of parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// A chat message (`{"role": ..., "content": ...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

impl Message {
    pub fn user(parts: Vec<ContentPart>) -> Self {
        Self { role: "user".into(), content: Content::Parts(parts) }
    }
    pub fn system(text: &str) -> Self {
        Self { role: "system".into(), content: Content::Text(text.into()) }
    }
    pub fn assistant(text: &str) -> Self {
        Self { role: "assistant".into(), content: Content::Parts(vec![ContentPart::Text { text: text.into() }]) }
    }
}

/// A conversation: the messages of one batch sample.
pub type Conversation = Vec<Message>;

/// Python `json.dumps(value, ensure_ascii=False, indent=indent)`: default separators `", "` /
/// `": "` (`","` with an indent), mapping keys in insertion order.
fn py_json(v: &Value, indent: Option<usize>, level: usize, out: &mut String) -> Result<(), Error> {
    use minijinja::value::ValueKind as K;
    let nl = |out: &mut String, l: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * l));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        K::Undefined | K::None => out.push_str("null"),
        K::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        K::Number => {
            if let Some(i) = v.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(v.clone()).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
                // Python prints floats with repr(): always a '.' or an exponent.
                let s =
                    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 { format!("{f:.1}") } else { f.to_string() };
                out.push_str(&s);
            }
        }
        K::String => out.push_str(&serde_json::to_string(v.as_str().unwrap_or_default()).unwrap_or_default()),
        K::Seq | K::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                nl(out, level + 1);
                py_json(x, indent, level + 1, out)?;
            }
            nl(out, level);
            out.push(']');
        }
        K::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                nl(out, level + 1);
                let key = k.as_str().map(str::to_string).unwrap_or_else(|| k.to_string());
                out.push_str(&serde_json::to_string(&key).unwrap_or_default());
                out.push_str(": ");
                py_json(&v.get_item(k)?, indent, level + 1, out)?;
            }
            nl(out, level);
            out.push('}');
        }
        _ => return Err(Error::new(ErrorKind::InvalidOperation, format!("cannot convert {} to JSON", v.kind()))),
    }
    Ok(())
}

fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _ = kwargs.get::<Option<Value>>("separators")?;
    let _ = kwargs.get::<Option<bool>>("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut s = String::new();
    py_json(&value, indent, 0, &mut s)?;
    Ok(Value::from_safe_string(s))
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

impl ChatTemplate {
    /// Compile `source` with jinja2's settings as transformers uses them.
    pub fn new(source: String) -> Result<Self, ProcessorError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        // Python string/dict/list methods (`.strip()`, `.startswith()`, `.items()`, ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source)
            .map_err(|e| ProcessorError::Template(format!("cannot compile the chat template: {e:#}")))?;
        Ok(Self { env })
    }

    /// Render with an arbitrary context (e.g. `{"messages": [...], "tools": [...],
    /// "add_generation_prompt": true}`), like `render_jinja_template(**kwargs)`.
    pub fn render_context<S: Serialize>(&self, ctx: &S) -> Result<String, ProcessorError> {
        let tmpl = self.env.get_template("chat").map_err(|e| ProcessorError::Template(e.to_string()))?;
        tmpl.render(Value::from_serialize(ctx))
            .map_err(|e| ProcessorError::Template(format!("rendering the chat template failed: {e:#}")))
    }

    /// Render one conversation. `special_tokens` are passed as template variables.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        special_tokens: &[(&str, Option<&str>)],
    ) -> Result<String, ProcessorError> {
        let tmpl = self.env.get_template("chat").map_err(|e| ProcessorError::Template(e.to_string()))?;
        let mut ctx = std::collections::BTreeMap::<String, Value>::new();
        for (k, v) in special_tokens {
            if let Some(v) = v {
                ctx.insert((*k).to_string(), Value::from(*v));
            }
        }
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        tmpl.render(ctx).map_err(|e| ProcessorError::Template(format!("rendering the chat template failed: {e:#}")))
    }
}
