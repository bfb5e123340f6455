"""The streaming template's token ids, tokenised identically in the exporter, the reference
and the runtime; a bundle's readers take the ids its bundle.json records (`token_ids`),
checked against its tokenizer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from onsight.runtime.errors import BundleError
from onsight.runtime.manifest_check import show_json
from onsight.runtime.stream_loop import TemplateIds

if TYPE_CHECKING:
    from onsight.runtime.bundle import Bundle


def _encode(tokenizer: Any, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_special_tokens=False).ids)


def single_token_id(tokenizer: Any, text: str) -> int | None:
    """The one token `text` is (by the vocabulary, or as it encodes); None if it is not one."""
    tid = tokenizer.token_to_id(text)
    if tid is None:
        ids = _encode(tokenizer, text)
        tid = ids[0] if len(ids) == 1 else None
    return None if tid is None else int(tid)


def _sequences(tokenizer: Any, template: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The multi-token pieces, each tokenised on its own."""
    return {
        "sink": _encode(tokenizer, template["bos"] + template["system_prompt"] + "\n"),
        "stream_open": _encode(tokenizer, template["stream_open"]),
        "stream_close": _encode(tokenizer, template["stream_close"]),
        "user_prefix": _encode(tokenizer, template["user_prefix"]),
        "assistant_prefix": _encode(tokenizer, template["assistant_prefix"]),
    }


def build_template_ids(tokenizer: Any, template: Mapping[str, Any]) -> TemplateIds:
    """`tokenizer` is a `tokenizers.Tokenizer`; `template` holds TemplateConfig's fields.
    What the exporter records in bundle.json's `token_ids`; a bundle's readers use
    `bundle_template_ids`, which reads those."""

    def single(text: str, what: str) -> int:
        tid = single_token_id(tokenizer, text)
        if tid is None:
            raise BundleError(
                f"the tokenizer has no single token for the {what} {text!r}; "
                "re-export with a tokenizer that has it"
            )
        return tid

    return TemplateIds(
        **_sequences(tokenizer, template),
        interval_id=single(template["interval_token"], "interval token"),
        eos_id=single(template["eos"], "end-of-turn token"),
    )


def bundle_template_ids(tokenizer: Any, bundle: Bundle) -> TemplateIds:
    """A bundle's template ids: the interval and end-of-turn ids its bundle.json records in
    `token_ids` (the stream loop decides on the one and stops at the other), and the other
    pieces, which bundle.json does not record, tokenised with the bundle's tokenizer.

    Refuses a bundle whose tokenizer disagrees with a recorded id or with the recorded
    length of the system prompt: the model would be fed, or read, other tokens than it was
    exported with (a hand-edited bundle.json, a swapped tokenizer, or a `tokenizers` release
    that splits the template differently)."""
    tpl, recorded = bundle.template, bundle.manifest["token_ids"]
    seqs = _sequences(tokenizer, tpl)
    checks = (  # (field, what the tokenizer gives, for what), as the exporter computes them
        (
            "interval",
            single_token_id(tokenizer, tpl["interval_token"]),
            f"the interval token {tpl['interval_token']!r}",
        ),
        ("eos", single_token_id(tokenizer, tpl["eos"]), f"the end-of-turn token {tpl['eos']!r}"),
        ("v", tokenizer.token_to_id(tpl["v_token"]), f"the vision token {tpl['v_token']!r}"),
        ("sink_length", len(seqs["sink"]), "the system prompt (bos + system_prompt + newline)"),
    )
    for field, got, what in checks:
        if recorded[field] != got:
            gives = "no single token" if got is None else got
            raise BundleError(
                f"bundle {bundle.path}: bundle.json records token_ids.{field} = "
                f"{show_json(recorded[field])} for {what}, but its tokenizer "
                f"({bundle.tokenizer_path.name}) gives {gives}; bundle.json and the tokenizer "
                "are from different exports (or this `tokenizers` release splits the template "
                "differently): re-export the bundle with `onsight export`"
            )
    return TemplateIds(**seqs, interval_id=int(recorded["interval"]), eos_id=int(recorded["eos"]))
