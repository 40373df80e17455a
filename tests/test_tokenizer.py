import importlib.util
import socket

import pytest

from modules.prompting.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, clip_tokenizer, read_vocabulary, tokenize, vocab_file


def test_known_prompt_ids():
    ids = clip_tokenizer()("a photo of an astronaut riding a horse")["input_ids"]
    assert ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]


def test_vocabulary_shape():
    tok = clip_tokenizer()
    assert tok.vocab_size == VOCAB_SIZE == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, EOS_ID) == (49406, 49407, 49407)
    assert tok.convert_tokens_to_ids(",</w>") == 267
    vocab, merges = read_vocabulary()
    assert len(merges) == 49408 - 512 - 2
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["".join(merges[0])] == 512


def test_tokenize_has_no_special_tokens_and_no_limit():
    assert tokenize(["a photo of an astronaut riding a horse"]) == [[320, 1125, 539, 550, 18376, 6765, 320, 4558]]
    assert tokenize([""]) == [[]]
    assert tokenize([]) == []
    assert len(tokenize(["cat " * 100])[0]) == 100


def test_case_and_whitespace_are_normalised():
    assert tokenize(["  A\tPHOTO \n\n of  "]) == tokenize(["a photo of"])


@pytest.fixture(scope="module")
def reference():
    """OpenAI's reference implementation, loaded from the file alone (the clip package's
    __init__ pulls in its model code)."""
    path = vocab_file().parent / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(vocab_file()))


@pytest.mark.parametrize("text", [
    "a photo of an astronaut riding a horse",
    "Hello,   WORLD!! it's 3.14159 o'clock",
    "café naïve façade Ångström",
    "東京 タワー, 😀🎨 emoji",
    "masterpiece, best quality, (1girl:1.2), [[blurry]], 8k uhd, dslr",
    "“curly quotes” and ﬁ ligature &amp; entity",
    "don't won't they're we've I'm you'll he'd",
    "a\u00a0non\u2009breaking space",
])
def test_matches_openai_reference_tokenizer(reference, text):
    assert tokenize([text])[0] == reference.encode(text)


def test_builds_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    tok = clip_tokenizer.__wrapped__()  # a fresh build, not the cached one
    assert tok("a horse")["input_ids"] == [49406, 320, 4558, 49407]
