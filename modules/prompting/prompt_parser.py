"""The prompt language of AUTOMATIC1111's web UI, as plain functions of text (no torch).

Users paste prompts and infotexts from A1111, so its results are the specification, quirks
included; the few deliberate differences are listed where they happen. Four layers, applied
in this order by `modules.conditioning`:

1. Composable diffusion, `split_and`: `a cat :1.2 AND a dog :0.8` is two prompts whose
   predictions are mixed with those weights. AND is a flat separator that A1111 splits on
   everywhere, even inside brackets, so a regular expression is the faithful tool here.
2. Prompt editing and alternation, `get_prompt_schedule` (a lark grammar):
   `[from:to:when]`, `[to:when]`, `[from::when]` switch text at a step; `[a|b|c]` cycles each
   step. `when` with a decimal point is a fraction of the steps (`0.25`), without one a step
   number (`5`), as A1111 does since 1.6; `old_scheduling=True` gives the older rule
   (below 1: fraction, otherwise a step number). Attention brackets are kept in the texts.
3. Attention, `parse_prompt_attention` (a lark lexer and a bracket stack): `(a)` x1.1,
   `[a]` /1.1, `(a:1.3)`, nested brackets multiply; `\\(` `\\)` `\\[` `\\]` `\\\\` are literal.
   Unbalanced brackets are not errors: an unclosed bracket weights the rest of the prompt.
4. `BREAK` in the attention output (`["BREAK", -1]`) makes conditioning start a new chunk.

`validate_prompt` is the strict check for request validation: it rejects what is clearly a
typo (a weight or step number that is not a number) while accepting everything A1111 accepts
by design, such as unbalanced brackets.
"""

from __future__ import annotations

import functools
import re

import lark

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_MARKER = ("BREAK", -1)


class PromptError(ValueError):
    """A prompt a person has to fix; `position` is the 0-based character index of the problem."""

    def __init__(self, message: str, position: int):
        super().__init__(message, position)
        self.message = message
        self.position = position

    def __str__(self) -> str:
        return f"{self.message} (at character {self.position + 1})"


# ----------------------------------------------------------------------------------------------
# Composable diffusion: AND

_AND = re.compile(r"\bAND\b")
# A part may end in ":weight"; the weight is a plain decimal (no exponent), as in A1111.
_AND_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """The AND-separated parts of a prompt with their weights (default 1.0).

    >>> split_and("a cat :1.2 AND a dog :0.8")
    [('a cat', 1.2), (' a dog', 0.8)]

    Trailing whitespace (and the weight) are removed from a part, leading whitespace is kept,
    exactly as A1111 builds the texts it encodes."""
    parts = []
    for part in _AND.split(prompt):
        text, weight = _AND_WEIGHT.match(part).groups()
        parts.append((text, 1.0 if weight is None else float(weight)))
    return parts


# ----------------------------------------------------------------------------------------------
# Prompt editing and alternation

# Brackets that do not form a construct are text; A1111 tolerates them only at the outermost
# level (STRAY), so `[a:[b:2]` still edits `b`, while inside a construct everything must balance.
# A "|" outside an alternation is not accepted anywhere: then the whole prompt is taken as
# written, with no editing at all, which is what A1111 does with such prompts.
_SCHEDULE_GRAMMAR = r"""
start: (_piece | STRAY)*
body: _piece*
_piece: edit | alternate | group | TEXT

group: "(" body ")"
     | "(" body ":" body ")"
     | "[" body "]"
edit: "[" (body ":")? body ":" _SPACE? NUMBER _SPACE? "]"
alternate: "[" body ("|" body)+ "]"

TEXT: /(?:[^\\\[\]():|]|\\.)+/
STRAY: /[\[\]():]/
NUMBER: /[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?/
_SPACE: /\s+/
"""


@functools.cache
def _schedule_parser() -> lark.Lark:
    return lark.Lark(_SCHEDULE_GRAMMAR, parser="earley", propagate_positions=True)


def _edit_step(number: str, steps: int, old_scheduling: bool) -> int:
    """The last step at which an edit still shows its `from` text (may be < 1: never)."""
    value = float(number)
    if old_scheduling:
        value = value * steps if value < 1 else value
    elif "." in number:
        value = value * steps
    return min(steps, int(value))


class _Schedule:
    """A parsed prompt that renders its text at any step."""

    def __init__(self, prompt: str, tree: lark.Tree, steps: int, old_scheduling: bool):
        self.prompt = prompt
        self.tree = tree
        self.edit_steps: dict[int, int] = {}  # id(edit node) -> last step of its `from` text
        self.switch_steps = {steps}
        for node in tree.iter_subtrees():
            if node.data == "edit":
                last = _edit_step(node.children[-1], steps, old_scheduling)
                self.edit_steps[id(node)] = last
                if last >= 1:
                    self.switch_steps.add(last)
            elif node.data == "alternate":
                self.switch_steps.update(range(1, steps + 1))

    def render(self, step: int) -> str:
        out: list[str] = []
        self._emit(self.tree, step, 0, len(self.prompt), out)
        return "".join(out)

    def _emit(self, node: lark.Tree, step: int, start: int, end: int, out: list[str]) -> None:
        """Source text from start to end with every edit/alternation inside replaced by its
        choice at `step`; anonymous tokens (brackets, colons) come from the source gaps."""
        pos = start
        for child in node.children:
            if isinstance(child, lark.Token):
                continue  # its text is in the source gap
            if child.meta.empty:
                continue
            out.append(self.prompt[pos:child.meta.start_pos])
            pos = child.meta.end_pos
            if child.data == "edit":
                bodies = [c for c in child.children if isinstance(c, lark.Tree)]
                chosen = bodies[-1] if step > self.edit_steps[id(child)] else (bodies[0] if len(bodies) == 2 else None)
                if chosen is not None:
                    self._emit_whole(chosen, step, out)
            elif child.data == "alternate":
                self._emit_whole(child.children[(step - 1) % len(child.children)], step, out)
            else:
                self._emit(child, step, child.meta.start_pos, child.meta.end_pos, out)
        out.append(self.prompt[pos:end])

    def _emit_whole(self, body: lark.Tree, step: int, out: list[str]) -> None:
        if not body.meta.empty:
            self._emit(body, step, body.meta.start_pos, body.meta.end_pos, out)


def get_prompt_schedule(prompt: str, steps: int, *, old_scheduling: bool = False) -> list[tuple[int, str]]:
    """[(end_at_step, text)]: `text` is the prompt up to and including step `end_at_step`.

    >>> get_prompt_schedule("a [b:.5] c", 10)
    [(5, 'a  c'), (10, 'a b c')]

    Steps count from 1; the last entry ends at `steps`. A prompt the grammar cannot read
    (unclosed edit, stray "|") is used as written for all steps, as in A1111."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    try:
        tree = _schedule_parser().parse(prompt)
    except lark.exceptions.LarkError:
        return [(steps, prompt)]
    schedule = _Schedule(prompt, tree, steps, old_scheduling)
    return [(step, schedule.render(step)) for step in sorted(schedule.switch_steps)]


# ----------------------------------------------------------------------------------------------
# Attention

# Only a lexer: attention brackets pair up like a stack machine, not like a tree ("([a)]" is
# valid and closes "(" first), and unmatched ones are text. Terminals try in priority order.
_ATTENTION_GRAMMAR = r"""
start: _token*
_token: ESCAPE | OPEN_ROUND | OPEN_SQUARE | WEIGHT_CLOSE | CLOSE_ROUND | CLOSE_SQUARE
      | BREAK | TEXT | COLON

ESCAPE.3: /\\[()\[\]\\]?/
BREAK.3: /\s*\bBREAK\b\s*/
WEIGHT_CLOSE.2: /:\s*[+-]?[.\d]+\s*\)/
OPEN_ROUND: "("
OPEN_SQUARE: "["
CLOSE_ROUND: ")"
CLOSE_SQUARE: "]"
COLON: ":"
TEXT: /(?:(?!\s*\bBREAK\b)[^\\()\[\]:])+/
"""

_WEIGHT_NUMBER = re.compile(r":\s*([+-]?[.\d]+)")


@functools.cache
def _attention_lexer() -> lark.Lark:
    return lark.Lark(_ATTENTION_GRAMMAR, parser="lalr", lexer="basic")


class _Weights:
    """Fragments [text, weight]; a closing bracket multiplies everything since it opened."""

    def __init__(self):
        self.fragments: list = []  # [text, weight] lists, and BREAK_MARKER itself
        self.round: list[int] = []
        self.square: list[int] = []

    def add_run(self, run: list[str]) -> None:
        """A text run split at its BREAKs; empty sides are kept, as A1111 keeps them."""
        for i, piece in enumerate(run):
            if i:
                self.fragments.append(BREAK_MARKER)
            self.fragments.append([piece, 1.0])

    def multiply_from(self, start: int, factor: float) -> None:
        for fragment in self.fragments[start:]:
            if fragment is not BREAK_MARKER:
                fragment[1] *= factor

    def closes(self, kind: str) -> bool:
        """Whether a closing token has a bracket to close; without one it is text."""
        return bool(self.square) if kind == "CLOSE_SQUARE" else bool(self.round)


def _weight_value(token: lark.Token) -> float:
    number = _WEIGHT_NUMBER.match(token).group(1)
    try:
        return float(number)
    except ValueError:
        raise PromptError(
            f"{number!r} is not a number; write an attention weight like (word:1.2)",
            token.start_pos + token.index(number),
        ) from None


_CLOSERS = ("WEIGHT_CLOSE", "CLOSE_ROUND", "CLOSE_SQUARE")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """[(text, weight)] of one prompt (after editing): neighbours with equal weights merged,
    `BREAK` as ("BREAK", -1).

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]

    Differs from A1111 in one way: a BREAK inside brackets is still a chunk break (A1111
    multiplies its marker's weight and then encodes the word "break" with a negative weight).
    Raises PromptError for a weight that is not a number, such as `(a:1.2.3)`, where A1111
    fails with a Python error."""
    state = _Weights()
    run: list[str] | None = None  # text since the last bracket, split at BREAKs

    for token in _attention_lexer().lex(text):
        kind = token.type
        is_text = kind in ("TEXT", "COLON", "BREAK") or (kind in _CLOSERS and not state.closes(kind))
        if is_text:
            run = run or [""]
            if kind == "BREAK":
                run.append("")
            else:
                run[-1] += token
            continue
        if run is not None:
            state.add_run(run)
            run = None
        if kind == "ESCAPE":
            state.add_run([token[1:]])
        elif kind == "OPEN_ROUND":
            state.round.append(len(state.fragments))
        elif kind == "OPEN_SQUARE":
            state.square.append(len(state.fragments))
        elif kind == "CLOSE_SQUARE":
            state.multiply_from(state.square.pop(), SQUARE_MULTIPLIER)
        elif kind == "CLOSE_ROUND":
            state.multiply_from(state.round.pop(), ROUND_MULTIPLIER)
        else:  # WEIGHT_CLOSE
            state.multiply_from(state.round.pop(), _weight_value(token))
    if run is not None:
        state.add_run(run)

    # Unclosed brackets reach to the end: round ones first, then square, oldest first.
    for start in state.round:
        state.multiply_from(start, ROUND_MULTIPLIER)
    for start in state.square:
        state.multiply_from(start, SQUARE_MULTIPLIER)

    merged: list = []
    for fragment in state.fragments or [["", 1.0]]:
        if fragment is BREAK_MARKER or not merged or merged[-1] is BREAK_MARKER or merged[-1][1] != fragment[1]:
            merged.append(fragment if fragment is BREAK_MARKER else list(fragment))
        else:
            merged[-1][0] += fragment[0]
    return [tuple(fragment) for fragment in merged]


# ----------------------------------------------------------------------------------------------
# Validation

# Where a number is expected: after ":" just before ")" (a weight) or "]" (an edit's step).
_NUMBER_SLOT = re.compile(r":\s*([+-]?[\d.,]*[\d.][\w.,+-]*?)\s*([)\]])")
# Text that only resembles a number by accident ("90s", "2girls") is left alone; checked are
# digits with separators or an exponent, and a decimal with letters in it ("1.x.2", "1.5x").
_LOOKS_NUMERIC = re.compile(r"[+-]?[\d.,]+(?:[eE][+-]?\d+)?|[+-]?\d*[.,]\d*[a-zA-Z_][\w.,+-]*")
_WEIGHT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")  # what A1111 reads as a weight
_STEP = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")  # the grammar's NUMBER
_SLOTS = {
    ")": (_WEIGHT, "an attention weight like (word:1.2)"),
    "]": (_STEP, "a step like [from:to:10] or a fraction like [from:to:0.5]"),
}


def validate_prompt(prompt: str) -> None:
    """Raises PromptError for a weight `(word:1.x.2)` or an editing step `[a:b:0,5]` that is not
    a number (A1111 would fail, or silently use the text as words). Everything A1111 accepts
    on purpose, such as unbalanced brackets and stray colons, passes."""
    for match in _NUMBER_SLOT.finditer(prompt):
        number, closer = match.groups()
        if not _LOOKS_NUMERIC.fullmatch(number):
            continue
        pattern, example = _SLOTS[closer]
        if not pattern.fullmatch(number):
            raise PromptError(f"{number!r} is not a plain number; write {example}", match.start(1))
