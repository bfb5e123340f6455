"""The demo model's tokenizer: byte-level BPE trained on the synthetic world's grammar.

Byte-level like Llama-3, so any text encodes (a user may type anything at `ask()`), with
Llama-3's special tokens and `<v>` added last: its id equals the LM's vocabulary size and
stays outside the embedding matrix, as VideoLLM-online's placeholder does.
"""

from __future__ import annotations

import logging
from pathlib import Path

from onsight.exporter.config import TemplateConfig
from onsight.runtime.synthetic.grammar import all_sentences

log = logging.getLogger(__name__)

# Short so every training sequence spends its tokens on frames, not on the prompt.
DEMO_SYSTEM_PROMPT = "Narrate what happens in the video."
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|eot_id|>")  # ids 0 and 1, as the builders use
V_TOKEN = "<v>"


def demo_template() -> TemplateConfig:
    """VideoLLM-online's template with the demo's short system prompt."""
    return TemplateConfig(system_prompt=DEMO_SYSTEM_PROMPT, max_new_tokens=24)


def _corpus(tpl: TemplateConfig) -> list[str]:
    sentences = all_sentences()
    # Narrations and answers follow "\nAssistant:" with a space; questions follow "User: "
    # directly. Both forms must be whole words so a narration costs one token per word.
    corpus = [f" {s}" for s in sentences] + sentences
    pieces = [
        tpl.system_prompt,
        tpl.stream_open,
        tpl.stream_close + tpl.assistant_prefix,
        tpl.stream_close + tpl.user_prefix,
        tpl.user_prefix,
        tpl.assistant_prefix,
    ]
    return corpus + pieces * 20


def train_tokenizer(out_path: str | Path, tpl: TemplateConfig | None = None) -> tuple[Path, int]:
    """Train and save tokenizer.json; returns (path, LM vocab size == id of `<v>`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tpl = tpl or demo_template()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,  # a ceiling: the grammar runs out of merges well before it
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(tpl), trainer)
    vocab = tok.get_vocab_size()
    tok.add_special_tokens([V_TOKEN])
    if tok.token_to_id(V_TOKEN) != vocab:
        raise RuntimeError("<v> must be the last id (the LM's vocab size)")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    log.info("tokenizer: %d LM tokens + <v> -> %s", vocab, out)
    return out, vocab
