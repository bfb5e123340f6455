"""The bundle's tokenizer: text to token ids and back (`tokenizers`, no transformers)."""

from __future__ import annotations

from pathlib import Path

from onsight.runtime.errors import BundleError


class Tokens:
    """Encodes without special tokens (the template adds its own) and decodes without them."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise BundleError(
                f"the bundle's tokenizer {path} cannot be read ({e}); re-export the bundle"
            ) from e

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()
