"""Infotext: the text format of the A1111 "parameters" stored in every PNG.

The text is three parts, as A1111 writes and reads it:

    a photo of a cat                      prompt, any number of lines
    Negative prompt: blurry               only when there is a negative prompt, may go on for lines
    Steps: 20, Sampler: DPM++ 2M, ...     one line of "key: value" pairs, always the last

Formatting and parsing are plain functions of text, torch-free, so reading an image's
parameters loads no model code. Which request fields a parameters line stands for is
generation/parameters.py's business.
"""

from __future__ import annotations

import json
import re

NEGATIVE_PREFIX = "Negative prompt:"

# One "key: value" pair of the parameters line. Keys start with a word character and go on with
# word characters, spaces, '-' and '/'; a value is either a JSON string (which may hold commas)
# or runs up to the next comma. A1111 reads the same grammar, so both recognise the same lines.
# Keys are bounded in length (A1111's longest are ~25 characters) so that a long line without a
# colon is scanned in linear, not quadratic, time.
_PAIR = re.compile(
    r"""
    (?P<key> \w [\w\ \-/]{1,63} ) : \s*
    (?P<value> " (?: \\. | [^\\"] )+ " | [^,]* )
    (?: , | $ )
    """,
    re.VERBOSE,
)
# A1111 takes the last line as parameters only when it holds at least this many pairs, so that a
# prompt line with a stray "word: word" stays part of the prompt.
_MIN_PAIRS = 3
_NEEDS_QUOTES = (",", ":", "\n")


def _format_value(value: object) -> str:
    """A1111's look for numbers: 7.0 is written "7", 7.5 stays "7.5"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def quote(value: str) -> str:
    """JSON-quoted when the value would otherwise break the "key: value, ..." line."""
    if any(mark in value for mark in _NEEDS_QUOTES):
        return json.dumps(value, ensure_ascii=False)
    return value


def unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return decoded if isinstance(decoded, str) else value


def format_params_line(params: dict[str, object]) -> str:
    """One "key: value, ..." line; None values are left out."""
    return ", ".join(f"{key}: {quote(_format_value(value))}" for key, value in params.items() if value is not None)


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """The full infotext; leading and trailing whitespace is dropped, as A1111 does."""
    line = format_params_line(params)
    parts = [prompt]
    if negative_prompt:
        parts.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    parts.append(line)
    return "\n".join(parts).strip()


def parse_params_line(line: str) -> dict[str, str]:
    """The "key: value" pairs of one line, quoted values decoded; later duplicates win."""
    return {m["key"]: unquote(m["value"]) for m in _PAIR.finditer(line)}


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, parameters) from an infotext; never raises.

    Text without a parameters line is all prompt. Lines are stripped, and every line after the
    one starting with "Negative prompt:" belongs to the negative prompt, as in A1111."""
    if not isinstance(text, str):
        return "", "", {}
    *lines, last = text.strip().split("\n")
    params: dict[str, str] = {}
    if len(_PAIR.findall(last)) >= _MIN_PAIRS:
        params = parse_params_line(last)
    else:
        lines.append(last)

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            target = negative_lines
            line = line[len(NEGATIVE_PREFIX):].strip()
        target.append(line)
    return "\n".join(prompt_lines), "\n".join(negative_lines), params
