"""A1111's extra-network syntax in prompts, as a plain function of text: `<lora:name:weight>`.

    >>> parse_extra_networks("a cat <lora:fluffy:0.8>, outdoors")
    ('a cat , outdoors', [NetworkCall(kind='lora', name='fluffy', te=0.8, unet=0.8, position=6)])

Every `<word:...>` tag is taken out of the text before the prompt is parsed and encoded, wherever
it stands (inside prompt editing too: the network then applies to every step), as A1111 does.
As in A1111, only the prompt has tags: in a negative prompt `<...>` is text.
The arguments after the name follow A1111's LoRA tag: `<lora:name>` (weight 1),
`<lora:name:te_weight>`, `<lora:name:te_weight:unet_weight>`, or named `te=...` / `unet=...`;
without a UNet weight the text-encoder weight is used for both. What A1111 would fail on or
quietly ignore (a weight that is not a number, an unknown network kind or argument) is a
PromptError with its position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modules.prompting.prompt_parser import PromptError

# A1111's pattern: a word, a colon, then anything up to the next ">".
TAG = re.compile(r"<(\w+):([^>]+)>")
KINDS = ("lora",)
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_ARGUMENTS = ("te", "unet")  # positional order after the name, and the names they can be given


@dataclass(frozen=True)
class NetworkCall:
    kind: str
    name: str
    te: float  # multiplier of the text-encoder part
    unet: float  # multiplier of the UNet part
    position: int  # 0-based index of the tag's "<" in the prompt


def _number(text: str, position: int, what: str) -> float:
    """`text` as a number; `position` is where `text` starts in the prompt."""
    stripped = text.strip()
    if not _NUMBER.fullmatch(stripped):
        raise PromptError(f"{stripped!r} is not a number; write the {what} like <lora:name:0.8>",
                          position + len(text) - len(text.lstrip()))
    return float(stripped)


def _call(match: re.Match) -> NetworkCall:
    kind, body = match.group(1), match.group(2)
    start = match.start()
    if kind not in KINDS:
        raise PromptError(f"unknown extra network <{kind}:...>; supported: " + ", ".join(f"<{k}:name:weight>" for k in KINDS), start)
    pieces, offsets = body.split(":"), [match.start(2)]
    for piece in pieces[:-1]:
        offsets.append(offsets[-1] + len(piece) + 1)
    name = pieces[0].strip()
    if not name:
        raise PromptError(f"<{kind}:...> needs a name, as in <{kind}:name:1>", start)
    # As in A1111: positional values count apart from named ones, and a named one wins.
    positional: list[float] = []
    named: dict[str, float] = {}
    for piece, offset in zip(pieces[1:], offsets[1:]):
        key, sep, value = piece.partition("=")
        if not sep:
            if len(positional) == len(_ARGUMENTS):
                raise PromptError(f"too many values in <{kind}:{body}>; write <{kind}:name:weight> or "
                                  f"<{kind}:name:te_weight:unet_weight>", offset)
            positional.append(_number(piece, offset, "weight"))
        elif key.strip() in _ARGUMENTS:
            named[key.strip()] = _number(value, offset + len(key) + 1, f"{key.strip()} weight")
        else:
            raise PromptError(f"unknown argument {key.strip()!r} in <{kind}:...>; known: " + ", ".join(_ARGUMENTS), offset)
    te = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else te)
    return NetworkCall(kind, name, te, unet, start)


def parse_extra_networks(prompt: str) -> tuple[str, list[NetworkCall]]:
    """(the prompt without its tags, the calls in order). Raises PromptError for a bad tag."""
    calls = [_call(match) for match in TAG.finditer(prompt)]
    return TAG.sub("", prompt), calls


def strip_extra_networks(prompt: str) -> str:
    """The prompt without its tags, for a prompt that passed parse_extra_networks."""
    return TAG.sub("", prompt)
