"""The LLM's tokenizer made ready for onsight: the `<v>` frame placeholder's id, and the
streaming template's begin and end-of-turn tokens read from the LLM's own files."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from onsight.exporter.ckpt_files import read_config
from onsight.exporter.config import TemplateConfig
from onsight.exporter.model import read_json
from onsight.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

V_TOKEN = "<v>"
# Chat end-of-turn markers are preferred as the template's eos: it ends every assistant turn.
_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>")

# Tokenizer copies with <v> added live until the process exits (the caller writes them into a
# bundle or a native checkpoint); TemporaryDirectory's finalizer removes them then.
_TOKENIZER_COPIES: list[tempfile.TemporaryDirectory] = []


def prepare_tokenizer(path: Path, vocab_rows: int, *, exact: bool) -> Path:
    """Check `<v>` in tokenizer.json, or add it in a copy; returns the file to use.

    `<v>` never reaches the embedding (frame embeddings replace it), so it needs only an id
    no real token has. `exact` (VideoLLM-online) also requires id == len(tokenizer) - 1 ==
    the embedding's row count, as that release was trained.
    """
    from tokenizers import AddedToken, Tokenizer

    raw = read_json(path, "tokenizer")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{path}: the tokenizers library cannot read it ({e})") from e
    size, v_id = tok.get_vocab_size(with_added_tokens=True), tok.token_to_id(V_TOKEN)
    declared = [t.get("id") for t in raw.get("added_tokens", []) if t.get("content") == V_TOKEN]
    if v_id is not None and declared and declared[0] != v_id:
        # tokenizers silently moves an added token whose id is taken; say so instead
        raise CheckpointError(
            f"{path}: key added_tokens gives {V_TOKEN} id {declared[0]}, which is the id of "
            f"{tok.id_to_token(declared[0])!r}; remove that entry and onsight will add {V_TOKEN}"
        )
    if size - (v_id is not None) > vocab_rows:
        raise CheckpointError(
            f"{path}: has more tokens than the LLM's {vocab_rows} embedding rows; is it the "
            "tokenizer of this LLM (--base / LLM dir)?"
        )
    if v_id is None:
        if exact and size != vocab_rows:
            raise CheckpointError(
                f"{path}: has {size} tokens, but {V_TOKEN} must get id {vocab_rows} (the base's "
                "vocab_size); use the adapter's own tokenizer.json"
            )
        tok.add_special_tokens([AddedToken(V_TOKEN, special=True, normalized=False)])
        tmp = tempfile.TemporaryDirectory(prefix="onsight-tokenizer-")
        _TOKENIZER_COPIES.append(tmp)  # kept until the process exits, then removed
        out = Path(tmp.name) / "tokenizer.json"
        tok.save(str(out))
        log.info("%s has no %s; wrote a copy with it at id %d to %s", path, V_TOKEN, size, out)
        return out
    if exact and not v_id == size - 1 == vocab_rows:
        what = "collides with a real token's id" if v_id < vocab_rows else "is past the vocabulary"
        raise CheckpointError(
            f"{path}: {V_TOKEN} has id {v_id} (tokenizer size {size}) but the base's embedding "
            f"has {vocab_rows} rows, so it {what}; VideoLLM-online puts {V_TOKEN} at "
            f"{vocab_rows}. Is --base the model this adapter was trained on?"
        )
    return path


def compose_template(llm_dir: Path, llm_cfg: dict, tokenizer_json: Path) -> TemplateConfig:
    """VideoLLM-online's template with the LLM's own bos (or none) and end-of-turn token."""
    from tokenizers import Tokenizer

    def token_str(value: object) -> str | None:  # a string, an AddedToken dict, or null
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) else None

    tok = Tokenizer.from_file(str(tokenizer_json))
    tc_path = llm_dir / "tokenizer_config.json"
    tc = read_config(tc_path, "tokenizer config") if tc_path.is_file() else {}
    if "bos_token" in tc and tc.get("add_bos_token", True) is not False:
        bos = token_str(tc["bos_token"]) or ""  # Qwen2 sets null: it has no bos
    else:
        bos = _post_processor_bos(read_json(tokenizer_json, "tokenizer"))
    eos = next((t for t in _END_OF_TURN if tok.token_to_id(t) is not None), None)
    eos = eos or token_str(tc.get("eos_token"))
    eos_id = llm_cfg.get("eos_token_id")
    eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
    if eos is None and isinstance(eos_id, int):
        eos = tok.id_to_token(eos_id)
    if eos is None or tok.token_to_id(eos) is None:
        raise CheckpointError(
            f"{tc_path}: cannot tell the end-of-turn token (eos_token {eos!r}); set "
            "eos_token there to a special token that tokenizer.json has"
        )
    return TemplateConfig(bos=bos, eos=eos)


def _post_processor_bos(raw: dict) -> str:
    """The special token a TemplateProcessing post-processor puts first (Llama-3 style)."""
    pp = raw.get("post_processor") or {}
    steps = pp.get("processors", [pp]) if pp.get("type") == "Sequence" else [pp]
    for step in steps:
        single = step.get("single") if step.get("type") == "TemplateProcessing" else None
        if single and "SpecialToken" in single[0]:
            return str(single[0]["SpecialToken"]["id"])
    return ""
