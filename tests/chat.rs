//! Chat templates rendered by moegen against transformers' `apply_chat_template` on the same
//! conversations (tests/fixtures/chat/expected.json, made by scripts/make_chat_fixtures.py).

use std::path::PathBuf;

use moegen::input::chat::{ChatTemplate, ModelTemplates};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
}

#[test]
fn every_fixture_template_renders_what_transformers_renders() {
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap();
    let now = expected["now"].as_i64().unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 25);
    let mut compared = 0;
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let conv = case["conversation"].as_str().unwrap();
        let text = std::fs::read_to_string(fixtures().join("templates").join(format!("{name}.jinja"))).unwrap();
        let token = |k: &str| case[k].as_str().map(str::to_string);
        let t = ChatTemplate::new(&text, name, token("bos_token"), token("eos_token")).unwrap_or_else(|e| panic!("{name}: {e}"));
        t.set_now(now);
        let messages = expected["conversations"][conv].as_array().unwrap();
        let got = t.render(messages);
        match case.get("prompt").and_then(Value::as_str) {
            Some(want) => {
                let got = got.unwrap_or_else(|e| panic!("{name} / {conv}: {e}"));
                assert_eq!(got, want, "{name} / {conv}");
                compared += 1;
            }
            None => assert!(got.is_err(), "{name} / {conv}: transformers refused it ({}), moegen rendered it", case["error"]),
        }
    }
    assert!(compared >= 20, "only {compared} renderings compared");
}

#[test]
fn a_template_that_raises_names_the_template_and_the_message() {
    let t = ChatTemplate::new("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}", "t.jinja", None, None).unwrap();
    let e = t.render(&[serde_json::json!({"role": "system", "content": "x"})]).unwrap_err().to_string();
    assert!(e.contains("t.jinja") && e.contains("first must be user"), "{e}");
    let e = ChatTemplate::new("{% for %}", "broken.jinja", None, None).unwrap_err().to_string();
    assert!(e.contains("broken.jinja") && e.contains("compile"), "{e}");
}

#[test]
fn templates_come_from_tokenizer_config_by_name() {
    let dir = std::env::temp_dir().join(format!("moegen-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
            "chat_template": [{"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content | upper }}{% endfor %}"},
                              {"name": "tool_use", "template": "T{{ messages | length }}{{ eos_token }}"}]}"#,
    )
    .unwrap();
    let m = ModelTemplates::from_hf_dir(&dir).unwrap();
    let msgs = [serde_json::json!({"role": "user", "content": "hi"})];
    assert_eq!(m.pick(None).unwrap().render(&msgs).unwrap(), "<s>HI");
    assert_eq!(m.pick(Some("tool_use")).unwrap().render(&msgs).unwrap(), "T1</s>");
    let e = m.pick(Some("rag")).unwrap_err().to_string();
    assert!(e.contains("rag") && e.contains("default, tool_use"), "{e}");
    let none = ModelTemplates::from_hf_dir(&std::env::temp_dir().join("moegen-chat-nothing-here")).unwrap();
    assert!(none.pick(None).unwrap_err().to_string().contains("--chat-template"));
    std::fs::remove_dir_all(&dir).unwrap();
}
