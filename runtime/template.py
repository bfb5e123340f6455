"""Tokenise the streaming template's pieces once, identically in the runtime and the reference."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from onsight.runtime.errors import BundleError
from onsight.runtime.stream_loop import TemplateIds


def build_template_ids(tokenizer: Any, template: Mapping[str, Any]) -> TemplateIds:
    """`tokenizer` is a `tokenizers.Tokenizer`; `template` holds TemplateConfig's fields."""

    def enc(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False).ids)

    def single(text: str, what: str) -> int:
        tid = tokenizer.token_to_id(text)
        ids = enc(text)
        if tid is None and len(ids) == 1:
            tid = ids[0]
        if tid is None:
            raise BundleError(
                f"the tokenizer has no single token for the {what} {text!r}; "
                "re-export with a tokenizer that has it"
            )
        return int(tid)

    return TemplateIds(
        sink=enc(template["bos"] + template["system_prompt"] + "\n"),
        stream_open=enc(template["stream_open"]),
        stream_close=enc(template["stream_close"]),
        user_prefix=enc(template["user_prefix"]),
        assistant_prefix=enc(template["assistant_prefix"]),
        interval_id=single(template["interval_token"], "interval token"),
        eos_id=single(template["eos"], "end-of-turn token"),
    )
