//! Chat messages into a prompt through the model's chat template (Jinja, as Hugging Face's
//! `apply_chat_template` renders it: trimmed blocks, Python's string methods, `raise_exception`,
//! a `tojson` that writes what Python's `json.dumps` writes).

use std::path::Path;

use minijinja::{Environment, ErrorKind, Value as JinjaValue};
use serde_json::Value;

use crate::error::{Error, Result};

/// A model's chat templates by name (`default` first when there is one) and the special-token
/// strings templates refer to.
#[derive(Clone, Debug, Default)]
pub struct ModelTemplates {
    pub templates: Vec<(String, String)>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Where they came from, for error messages.
    pub source: String,
}

/// A token in `tokenizer_config.json`: a string, or an `AddedToken` object with `content`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ModelTemplates {
    /// From a Hugging Face directory's `tokenizer_config.json` (a `chat_template` string or list of
    /// `{name, template}`), or `chat_template.jinja` beside it; empty when there is neither.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let mut out = ModelTemplates { source: path.display().to_string(), ..Default::default() };
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|error| Error::Io { path: path.clone(), error })?;
            let v: Value = serde_json::from_str(&text).map_err(|e| Error::invalid(path.display().to_string(), format!("not valid JSON: {e}")))?;
            out.bos_token = token_text(v.get("bos_token"));
            out.eos_token = token_text(v.get("eos_token"));
            match v.get("chat_template") {
                None | Some(Value::Null) => {}
                Some(Value::String(t)) => out.templates.push(("default".into(), t.clone())),
                Some(Value::Array(list)) => {
                    for item in list {
                        let (Some(name), Some(t)) = (item.get("name").and_then(Value::as_str), item.get("template").and_then(Value::as_str)) else {
                            return Err(Error::invalid(out.source.clone(), "`chat_template` list entries need a `name` and a `template`"));
                        };
                        out.templates.push((name.into(), t.into()));
                    }
                }
                Some(other) => return Err(Error::invalid(out.source.clone(), format!("`chat_template` should be a string or a list, found {other}"))),
            }
        }
        let jinja = dir.join("chat_template.jinja");
        if out.templates.is_empty() && jinja.exists() {
            let t = std::fs::read_to_string(&jinja).map_err(|error| Error::Io { path: jinja.clone(), error })?;
            out.templates.push(("default".into(), t));
            out.source = jinja.display().to_string();
        }
        Ok(out)
    }

    /// From a GGUF file's metadata: `tokenizer.chat_template` (as `default`) and
    /// `tokenizer.chat_template.NAME`, the BOS/EOS strings from the embedded vocabulary.
    pub fn from_gguf(m: &std::collections::BTreeMap<String, crate::loader::gguf::Meta>, file: &str) -> Self {
        let mut out = ModelTemplates { source: file.to_string(), ..Default::default() };
        for (k, v) in m {
            let name = match k.strip_prefix("tokenizer.chat_template") {
                Some("") => "default",
                Some(rest) => match rest.strip_prefix('.') {
                    Some(n) => n,
                    None => continue,
                },
                None => continue,
            };
            if let Some(t) = v.as_str() {
                out.templates.push((name.to_string(), t.to_string()));
            }
        }
        let token = |key: &str| {
            let id = m.get(key)?.as_u64()? as usize;
            match m.get("tokenizer.ggml.tokens")? {
                crate::loader::gguf::Meta::Array(a) => a.get(id)?.as_str().map(str::to_string),
                _ => None,
            }
        };
        out.bos_token = token("tokenizer.ggml.bos_token_id");
        out.eos_token = token("tokenizer.ggml.eos_token_id");
        out
    }

    /// The template `name` asks for: `None` takes `default` (or the only one).
    pub fn pick(&self, name: Option<&str>) -> Result<ChatTemplate> {
        let found = match name {
            Some(n) => self.templates.iter().find(|(k, _)| k == n),
            None => self.templates.iter().find(|(k, _)| k == "default").or(self.templates.first()),
        };
        let Some((n, t)) = found else {
            let have: Vec<&str> = self.templates.iter().map(|(k, _)| k.as_str()).collect();
            return Err(match name {
                Some(n) => {
                    let known = if have.is_empty() { "the model has none".to_string() } else { have.join(", ") };
                    Error::invalid("--chat-template", format!("{n:?} is neither a file nor one of the model's templates ({known})"))
                }
                None => Error::invalid(
                    "chat input",
                    format!("the model has no chat template ({} has none); give one with --chat-template FILE", self.source),
                ),
            });
        };
        ChatTemplate::new(t, &format!("{} (template {n:?})", self.source), self.bos_token.clone(), self.eos_token.clone())
    }
}

/// One compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Seconds since the epoch that `strftime_now` reads (None: the clock), shared with the
    /// function registered in `env`.
    now: std::sync::Arc<std::sync::Mutex<Option<i64>>>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.source).finish()
    }
}

/// Python's `json.dumps(v, ensure_ascii=False, indent=indent)` with its default separators.
fn python_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                python_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                python_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        Value::Number(n) if n.is_f64() => {
            // Python writes 1.0 where serde_json writes 1.0 too, and 1e+20 as 1e+20.
            out.push_str(&n.to_string());
        }
        other => out.push_str(&other.to_string()),
    }
}

/// transformers' `{% generation %}` ... `{% endgeneration %}` marks the assistant's text (for
/// training masks) and renders its body unchanged; minijinja has no such tag, so each becomes
/// `{% if true %}` ... `{% endif %}`, a block of the same shape, so that trim_blocks,
/// lstrip_blocks and the `-` markers strip the same whitespace around it.
fn with_generation_as_blocks(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(end) = tag.find("%}") else { break };
        let inner = &tag[2..end];
        let (open, body, close) = split_markers(inner);
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{open} if true {close}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{open} endif {close}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// A tag's inside split into its leading and trailing whitespace-control markers (`-`, `+`)
/// and what lies between.
fn split_markers(inner: &str) -> (&str, &str, &str) {
    let open = if inner.starts_with('-') || inner.starts_with('+') { &inner[..1] } else { "" };
    let inner = &inner[open.len()..];
    let close = if inner.ends_with('-') || inner.ends_with('+') { &inner[inner.len() - 1..] } else { "" };
    (open, &inner[..inner.len() - close.len()], close)
}

impl ChatTemplate {
    pub fn new(template: &str, source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        // What transformers sets on its Jinja environment.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<JinjaValue, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        let now: std::sync::Arc<std::sync::Mutex<Option<i64>>> = Default::default();
        let clock = now.clone();
        env.add_function("strftime_now", move |fmt: String| -> String {
            let secs = clock.lock().unwrap().unwrap_or_else(|| {
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
            });
            strftime(&fmt, secs)
        });
        env.add_filter("tojson", |v: JinjaValue, kwargs: minijinja::value::Kwargs| -> std::result::Result<String, minijinja::Error> {
            let indent: Option<usize> = kwargs.get("indent")?;
            let _: Option<bool> = kwargs.get("ensure_ascii")?;
            let _: Option<bool> = kwargs.get("sort_keys")?;
            let v = serde_json::to_value(&v).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
            let mut out = String::new();
            python_json(&v, indent, 0, &mut out);
            Ok(out)
        });
        env.add_template_owned("chat", with_generation_as_blocks(template))
            .map_err(|e| Error::invalid(source, format!("the chat template does not compile: {e}")))?;
        Ok(ChatTemplate { env, now, source: source.to_string(), bos_token, eos_token })
    }

    /// From a file given with `--chat-template`.
    pub fn from_file(path: &Path, model: &ModelTemplates) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| Error::Io { path: path.to_path_buf(), error })?;
        ChatTemplate::new(&text, &path.display().to_string(), model.bos_token.clone(), model.eos_token.clone())
    }

    /// Renders `strftime_now` at this time (seconds since the epoch) instead of the clock's.
    pub fn set_now(&self, secs: i64) {
        *self.now.lock().unwrap() = Some(secs);
    }

    /// The prompt of `messages` (OpenAI chat messages) with the generation prompt added.
    pub fn render(&self, messages: &[Value]) -> Result<String> {
        let t = self.env.get_template("chat").expect("added in new");
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        t.render(ctx).map_err(|e| {
            let detail = match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("").to_string(),
                _ => e.to_string(),
            };
            Error::invalid(&self.source, format!("rendering the chat template failed: {detail}"))
        })
    }
}

/// `secs` as `strftime` formats it, for templates that print today's date (UTC; the fields
/// templates use: %d %m %Y %y %b %B %H %M %S).
fn strftime(fmt: &str, secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (year, month, day) = crate::planner::civil_date(days);
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_render_their_body_with_the_same_whitespace() {
        let marked = "{%- for m in messages %}\n  {%- if m.role == 'assistant' %}\n    {%- generation -%}\n {{ m.content }}\n    {%- endgeneration %}\n  {%- else %}{{ m.content }}{% endif %}\n{% endfor %}";
        let plain = "{%- for m in messages %}\n  {%- if m.role == 'assistant' %}\n    {{- m.content }}\n  {%- else %}{{ m.content }}{% endif %}\n{% endfor %}";
        let messages = [serde_json::json!({"role": "user", "content": "hi"}), serde_json::json!({"role": "assistant", "content": "there"})];
        let env = |t: &str| ChatTemplate::new(t, "test", None, None).unwrap();
        let render = |c: &ChatTemplate| c.env.get_template("chat").unwrap().render(minijinja::context! { messages => messages.to_vec() }).unwrap();
        assert_eq!(render(&env(marked)), "hithere");
        assert_eq!(render(&env(marked)), render(&env(plain)));
        // Other tags, and the text around them, are left as they are.
        assert_eq!(with_generation_as_blocks("a{% if x %}b{% endif %}{{ '%}' }}"), "a{% if x %}b{% endif %}{{ '%}' }}");
        assert_eq!(with_generation_as_blocks("{%+ generation %}x{%- endgeneration -%}"), "{%+ if true %}x{%- endif -%}");
    }
}
