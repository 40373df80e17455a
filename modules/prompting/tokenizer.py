"""The CLIP BPE tokenizer of SD 1.x, built offline from the vocabulary file that clip-anytorch ships.

OpenAI's CLIP keeps its whole vocabulary in one file, `bpe_simple_vocab_16e6.txt.gz`: a header
line, then BPE merges ("a b" per line). The token ids are implied by construction order, and
this module reproduces that order exactly:

    256 byte characters, the same 256 with "</w>" (end of word), one token per merge,
    then <|startoftext|> (49406) and <|endoftext|> (49407)           -> 49408 entries

Nothing is read from the Hugging Face hub, so it works with HF_HUB_OFFLINE=1 and no network.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import ftfy
from transformers import CLIPTokenizer

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
# Merges used by CLIP: the file holds more, CLIP stops where the vocabulary is full.
_MERGE_COUNT = VOCAB_SIZE - 2 * 256 - 2


def vocab_file() -> Path:
    """Path of the BPE file inside the installed `clip` package (clip-anytorch)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The `clip` package (pip name clip-anytorch, a k-diffusion dependency) is not installed; "
            f"it provides {VOCAB_FILE_NAME}, the CLIP tokenizer's vocabulary."
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / VOCAB_FILE_NAME
        if path.is_file():
            return path
    raise RuntimeError(f"{VOCAB_FILE_NAME} is missing from the installed `clip` package; reinstall clip-anytorch.")


def byte_characters() -> list[str]:
    """CLIP's byte -> printable character table, in byte order 0..255.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, soft hyphen)
    are moved to code points 256 and up, so every byte has a visible character."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept_set = set(kept)
    table = {b: b for b in kept}
    moved = 0
    for b in range(256):
        if b not in kept_set:
            table[b] = 256 + moved
            moved += 1
    # The vocabulary lists the kept bytes first, then the moved ones, each as its character.
    order = kept + [b for b in range(256) if b not in kept_set]
    return [chr(table[b]) for b in order]


def read_vocabulary(path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges in rank order) exactly as CLIP builds them from its BPE file."""
    lines = gzip.decompress(Path(path or vocab_file()).read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + _MERGE_COUNT]]
    if len(merges) != _MERGE_COUNT or any(len(m) != 2 for m in merges):
        raise RuntimeError(f"{path or vocab_file()} does not look like CLIP's BPE merges file.")
    chars = byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}.")
    return vocab, merges


@functools.cache
def clip_tokenizer() -> CLIPTokenizer:
    """The SD 1.x CLIP tokenizer (transformers, fast backend), built without any download.

    Its normalizer lower-cases and collapses whitespace as CLIP does; `clean_text` adds CLIP's
    ftfy text repair, which the fast tokenizer cannot express. Use `tokenize` for prompts."""
    vocab, merges = read_vocabulary()
    # transformers 5 takes the vocabulary as a dict and merges as pairs; given file names under
    # other keywords it would quietly build a 3-token tokenizer instead.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    if tokenizer.vocab_size != VOCAB_SIZE or tokenizer.bos_token_id != BOS_ID or tokenizer.eos_token_id != EOS_ID:
        raise RuntimeError("transformers built a CLIP tokenizer with an unexpected vocabulary; check its version.")
    return tokenizer


def clean_text(text: str) -> str:
    """CLIP's text repair before BPE: ftfy fixes mojibake, HTML entities, curly quotes and the like.
    Lower-casing and whitespace are left to the tokenizer's own normalizer."""
    return ftfy.fix_text(text)


def tokenize(texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without BOS/EOS and without truncation."""
    if not texts:
        return []
    # The backend directly: the wrapper would warn about texts longer than 77 tokens, which
    # is normal here since conditioning splits them into chunks.
    encodings = clip_tokenizer().backend_tokenizer.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)
    return [e.ids for e in encodings]
