#!/usr/bin/env python3
"""Expected chat prompts for tests/chat.rs: each template in tests/fixtures/chat/templates/ applied
by transformers' `apply_chat_template` (add_generation_prompt=True) to a set of conversations.

Pinned: transformers==5.23.0 (and the jinja2 it installs). Run:
    python3 -m venv /tmp/chatvenv && /tmp/chatvenv/bin/pip install transformers==5.23.0 jinja2
    /tmp/chatvenv/bin/python scripts/make_chat_fixtures.py
Templates that print today's date get a frozen clock (NOW below); the test sets the same.
"""
import datetime as real_datetime
import json
import pathlib

import transformers
from transformers.utils import chat_template_utils
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

assert transformers.__version__ == "5.23.0", transformers.__version__

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "chat"
NOW = 1796212800  # 2026-12-02 12:00:00 UTC


class FrozenDatetime(real_datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return real_datetime.datetime.fromtimestamp(NOW, tz=real_datetime.timezone.utc).replace(tzinfo=tz)


chat_template_utils.datetime = FrozenDatetime
# The compiled environment is cached: start from a clean one.
if hasattr(chat_template_utils, "_compile_jinja_template"):
    chat_template_utils._compile_jinja_template.cache_clear()

# Special tokens each family's tokenizer_config.json gives.
SPECIALS = {
    "Qwen-Qwen3-0.6B": (None, "<|im_end|>"),
    "Qwen-Qwen2.5-7B-Instruct": (None, "<|im_end|>"),
    "deepseek-ai-DeepSeek-V3.1": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "mistralai-Mistral-Nemo-Instruct-2407": ("<s>", "</s>"),
    "Mistral-Small-3.2-24B-Instruct-2506": ("<s>", "</s>"),
    "chatml-generation-tags": (None, "<|im_end|>"),
}

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is a mixture of experts?"}],
    "system": [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Why stream weights from host memory?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "And one larger than 100?"},
    ],
    "system_multi_turn": [
        {"role": "system", "content": "Be terse.\nNo lists."},
        {"role": "user", "content": "  Hello  "},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "1, 2, 3."},
        {"role": "user", "content": "Backwards?"},
    ],
    "unicode": [
        {"role": "user", "content": "Traduis « bonjour » en 日本語, s'il te plaît 🙂"},
        {"role": "assistant", "content": "こんにちは — konnichiwa."},
        {"role": "user", "content": "Ελληνικά; \"quotes\" and \\ backslash\ttab"},
    ],
}


def main():
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(ROOT / "assets" / "default-model" / "tokenizer.json")))
    expected = {"now": NOW, "transformers": transformers.__version__, "cases": []}
    for path in sorted((FIX / "templates").glob("*.jinja")):
        name = path.stem
        template = path.read_text()
        bos, eos = SPECIALS[name]
        tok.bos_token, tok.eos_token = bos, eos
        for conv_name, conv in CONVERSATIONS.items():
            try:
                text = tok.apply_chat_template(conv, chat_template=template, tokenize=False, add_generation_prompt=True)
                expected["cases"].append({"template": name, "conversation": conv_name, "bos_token": bos, "eos_token": eos, "prompt": text})
            except Exception as e:  # a template may refuse a conversation (e.g. alternation rules)
                expected["cases"].append({"template": name, "conversation": conv_name, "bos_token": bos, "eos_token": eos, "error": str(e)})
    expected["conversations"] = CONVERSATIONS
    (FIX / "expected.json").write_text(json.dumps(expected, ensure_ascii=False, indent=1) + "\n")
    print(len(expected["cases"]), "cases")


if __name__ == "__main__":
    main()
