#!/usr/bin/env python3
"""Parses every line of a moegen OpenAI batch output file with the openai package's own types
(pinned: openai==3.57.0 in scripts/test.sh): the body of a response as ChatCompletion or
Completion, an error as BatchError. Exits non-zero naming the first line that does not parse."""
import json
import sys

from openai.types import BatchError, Completion
from openai.types.chat import ChatCompletion


def main(path):
    n = 0
    for i, line in enumerate(open(path, encoding="utf-8"), 1):
        v = json.loads(line)
        if "custom_id" not in v:
            continue  # a line of moegen's own format
        assert isinstance(v["custom_id"], str) and v["id"].startswith("batch_req_"), f"line {i}"
        if v.get("error") is not None:
            BatchError.model_validate(v["error"], strict=False)
            assert v["response"] is None, f"line {i}"
        else:
            body = v["response"]["body"]
            assert v["response"]["status_code"] == 200, f"line {i}"
            kind = {"chat.completion": ChatCompletion, "text_completion": Completion}[body["object"]]
            parsed = kind.model_validate(body)
            assert parsed.usage.total_tokens == parsed.usage.prompt_tokens + parsed.usage.completion_tokens, f"line {i}"
        n += 1
    print(f"{n} OpenAI batch lines parsed")


if __name__ == "__main__":
    main(sys.argv[1])
