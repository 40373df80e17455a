"""The prompt language, case by case. Expected values are A1111's results (its doctests
included), except where a case says it differs on purpose."""

import pytest

from modules.prompting.extra_networks import NetworkCall, parse_extra_networks
from modules.prompting.prompt_parser import (
    PromptError,
    get_prompt_schedule,
    parse_prompt_attention,
    split_and,
    validate_prompt,
)


def alternating(steps, *options):
    return [(step, options[(step - 1) % len(options)]) for step in range(1, steps + 1)]


LANDSCAPE = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
             "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")

SCHEDULE_CASES = [
    # A1111 doctests (steps=10)
    ("test", 10, [(10, "test")]),
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 10, alternating(10, "a", "(b:1.1)")),
    ("[fe|]male", 10, alternating(10, "female", "male")),
    ("[fe|||]male", 10, alternating(10, "female", "male", "male", "male")),
    # A1111's doctest claims an edit here, but its grammar (no "|" outside alternation) reads
    # the prompt as text, and that is what A1111 generates with.
    ("a [{b|d{:.5] c", 10, [(10, "a [{b|d{:.5] c")]),
    # the example at the top of A1111's prompt_parser
    (LANDSCAPE, 100, [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]),
    # numbers: a decimal point means a fraction, otherwise a step; clamped to the steps
    ("[a:b:1e-1]", 10, [(10, "b")]),
    ("[a:b:1.5]", 10, [(10, "a")]),
    ("[a:b:1.0]", 10, [(10, "a")]),
    ("[a:b:3.]", 10, [(10, "a")]),
    ("[a:b:0]", 10, [(10, "b")]),
    ("[a:b:-1]", 10, [(10, "b")]),
    ("[a:b:+2]", 10, [(2, "a"), (10, "b")]),
    ("[a:b:20]", 10, [(10, "a")]),
    ("[a:b:0.5]", 1, [(1, "b")]),
    ("[a:b:3 ]", 10, [(3, "a"), (10, "b")]),
    ("[ a : b : 3 ]", 10, [(3, " a "), (10, " b ")]),
    ("[a::2]", 3, [(2, "a"), (3, "")]),
    # several edits, nesting, alternation inside editing and editing inside alternation
    ("[a:b:3] [c:d:0.5]", 10, [(3, "a c"), (5, "b c"), (10, "b d")]),
    ("[[a|b]:c:2]", 4, [(1, "a"), (2, "b"), (3, "c"), (4, "c")]),
    ("[a:[b|c]:2]", 4, [(1, "a"), (2, "a"), (3, "b"), (4, "c")]),
    ("[[a:b:1]|c]", 4, [(1, "a"), (2, "c"), (3, "b"), (4, "c")]),
    ("[a|b|c]", 5, alternating(5, "a", "b", "c")),
    ("[|x]", 3, [(1, ""), (2, "x"), (3, "")]),
    # attention syntax and escapes stay in the texts
    ("([a:b:2])", 4, [(2, "(a)"), (4, "(b)")]),
    ("[[a:b:2]]", 3, [(2, "[a]"), (3, "[b]")]),
    ("(x:[a:b:2])", 3, [(2, "(x:a)"), (3, "(x:b)")]),
    ("[a\\:b:3]", 10, [(3, ""), (10, "a\\:b")]),
    ("\\[a:b:3\\]", 10, [(10, "\\[a:b:3\\]")]),
    ("a\\|b [c:1]", 3, [(1, "a\\|b "), (3, "a\\|b c")]),
    # what the grammar cannot read is used as written, for every step
    ("", 10, [(10, "")]),
    ("[a:b:c:3]", 10, [(10, "[a:b:c:3]")]),
    ("a | b [c:3]", 10, [(10, "a | b [c:3]")]),
    ("end \\", 10, [(10, "end \\")]),
    # AND is not this layer's business
    ("a [b:3] AND c", 10, [(3, "a  AND c"), (10, "a b AND c")]),
]


@pytest.mark.parametrize("prompt, steps, expected", SCHEDULE_CASES)
def test_prompt_schedule(prompt, steps, expected):
    assert get_prompt_schedule(prompt, steps) == expected


@pytest.mark.parametrize("prompt, expected", [
    ("[a:b:1e-1]", [(1, "a"), (10, "b")]),
    ("[a:b:1.5]", [(1, "a"), (10, "b")]),
    ("[a:b:3.]", [(3, "a"), (10, "b")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
])
def test_old_scheduling_reads_numbers_below_one_as_fractions(prompt, expected):
    assert get_prompt_schedule(prompt, 10, old_scheduling=True) == expected


def test_schedule_needs_a_step():
    with pytest.raises(ValueError):
        get_prompt_schedule("a", 0)


R = 1.1
S = 1 / 1.1

ATTENTION_CASES = [
    # A1111 doctests
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1),
    ]),
    # brackets
    ("", [("", 1.0)]),
    ("((word))", [("word", R * R)]),
    ("[word]", [("word", S)]),
    ("[[x]]", [("x", S * S)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(word: 1.3 )", [("word", 1.3)]),
    ("((a:2):3)", [("a", 6.0)]),
    ("[(a:2)]", [("a", 2 * S)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("a (b [c] d:1.5) e", [("a ", 1.0), ("b ", 1.5), ("c", S * 1.5), (" d", 1.5), (" e", 1.0)]),
    ("([a)]", [("a", R * S)]),  # brackets close as a stack per kind, not as a tree
    # not weights: text
    ("(word:1e-1)", [("word:1e-1", 1.1)]),
    ("(a:1.x.2)", [("a:1.x.2", 1.1)]),
    ("a:1.2)", [("a:1.2)", 1.0)]),
    ("unbalanced)", [("unbalanced)", 1.0)]),
    ("x:y", [("x:y", 1.0)]),
    ("[a:b:3]", [("a:b:3", S)]),
    # escapes; a backslash before anything else disappears
    ("\\\\", [("\\", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    ("\\(a\\) (b)", [("(a) ", 1.0), ("b", 1.1)]),
    # BREAK, with the empty texts A1111 keeps around it
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1), ("", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1), ("", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("(a)BREAK", [("a", 1.1), ("", 1.0), ("BREAK", -1), ("", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("BREAKfast", [("BREAKfast", 1.0)]),
    # differs from A1111 on purpose: its marker would become the word "break" weighted -1.1
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1), ("b", 1.1)]),
]


@pytest.mark.parametrize("text, expected", ATTENTION_CASES)
def test_parse_prompt_attention(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize("text, position", [("(a:1.2.3)", 3), ("x (a:.)", 5), ("(a: ..)", 4)])
def test_unreadable_weight_is_a_prompt_error(text, position):
    with pytest.raises(PromptError) as info:
        parse_prompt_attention(text)
    assert info.value.position == position
    assert "not a number" in str(info.value) and f"character {position + 1}" in str(info.value)


def test_unreadable_weight_without_an_open_bracket_is_text():
    assert parse_prompt_attention("a:1.2.3)") == [("a:1.2.3)", 1.0)]


AND_CASES = [
    ("a :1.2 AND b :0.8", [("a", 1.2), (" b", 0.8)]),
    ("cat:2", [("cat", 2.0)]),
    ("a AND b", [("a", 1.0), (" b", 1.0)]),
    ("x AND y AND z:3.", [("x", 1.0), (" y", 1.0), (" z", 3.0)]),
    ("a: -1.5  AND b:.5", [("a", -1.5), (" b", 0.5)]),
    ("a\nAND\nb:2", [("a", 1.0), ("\nb", 2.0)]),
    ("ANDROID and sand", [("ANDROID and sand", 1.0)]),
    ("(word:1.2)", [("(word:1.2)", 1.0)]),
    ("a:1e2", [("a:1e2", 1.0)]),
    ("a AND", [("a", 1.0), ("", 1.0)]),
    ("[a AND b:3]", [("[a", 1.0), (" b:3]", 1.0)]),  # AND splits even inside brackets
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("prompt, expected", AND_CASES)
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected


@pytest.mark.parametrize("prompt, bad, position", [
    ("(word:1.2.3)", "1.2.3", 6),
    ("(word:1.x.2)", "1.x.2", 6),
    ("a (word:1,2)", "1,2", 8),
    ("(a:1e-1)", "1e-1", 3),
    ("(a:1.5x)", "1.5x", 3),
    ("(a:.)", ".", 3),
    ("[cat:dog:0,5]", "0,5", 9),
    ("[cat:dog:1.2.3]", "1.2.3", 9),
])
def test_validate_rejects_numbers_that_are_not(prompt, bad, position):
    with pytest.raises(PromptError) as info:
        validate_prompt(prompt)
    assert info.value.position == position
    assert repr(bad) in info.value.message


@pytest.mark.parametrize("prompt", [
    "", "(unbalanced", "unbalanced)", "((a][:b:c [d:3]", "a:) :D", "(so sad :,)", "(style:90s)",
    "(2girls)", "(score:9)", "(a:-1)", "(a:+1.)", "(a: 1.2 )", "[a:b: 3 ]", "[a:b:.5]", "[a:b:1e-1]",
    "a :1.2 AND b :0.8", "a BREAK b", "(ratio 4:3, 16:9)", "at 12:30",
])
def test_validate_accepts_what_a1111_accepts_on_purpose(prompt):
    validate_prompt(prompt)


def test_prompt_error_is_a_value_error():
    assert issubclass(PromptError, ValueError)


# ----------------------------------------------------------------------------------------------
# Extra networks: <lora:name:weight>


def lora_call(name, te=1.0, unet=None, position=0):
    return NetworkCall("lora", name, te, te if unet is None else unet, position)


EXTRA_NETWORK_CASES = [
    ("a cat <lora:fluffy:0.8>, outdoors", "a cat , outdoors", [lora_call("fluffy", 0.8, position=6)]),
    ("<lora:x>", "", [lora_call("x")]),
    ("<lora:x:1:0.5>", "", [lora_call("x", 1.0, 0.5)]),
    ("<lora:x:unet=0.3>", "", [lora_call("x", 1.0, 0.3)]),
    ("<lora:x:te=0.5>", "", [lora_call("x", 0.5, 0.5)]),
    ("<lora:x:te=0.5:0.8>", "", [lora_call("x", 0.5, 0.5)]),  # A1111: the named te wins over the positional one
    ("<lora: my style v2 :-1.5>", "", [lora_call("my style v2", -1.5)]),
    ("<lora:x:1e-1>", "", [lora_call("x", 0.1)]),
    ("<lora:x:.5> and <lora:y:2.>", " and ", [lora_call("x", 0.5), lora_call("y", 2.0, position=16)]),
    # tags leave prompt editing and attention around them intact, and apply at every step
    ("[<lora:a:1>cat:dog:0.5]", "[cat:dog:0.5]", [lora_call("a", position=1)]),
    ("(red <lora:b:0.7>:1.2)", "(red :1.2)", [lora_call("b", 0.7, position=5)]),
    # not tags: text
    ("I <3 cats", "I <3 cats", []),
    ("a <b> c", "a <b> c", []),
    ("<lora:>", "<lora:>", []),
    ("x: <y", "x: <y", []),
]


@pytest.mark.parametrize("prompt, text, calls", EXTRA_NETWORK_CASES)
def test_extra_networks(prompt, text, calls):
    assert parse_extra_networks(prompt) == (text, calls)


@pytest.mark.parametrize("prompt, words, position", [
    ("a <lora:x:notanumber>", "'notanumber' is not a number", 10),
    ("<lora:x: 1.x>", "'1.x' is not a number", 9),
    ("<lora:x:te=abc>", "'abc' is not a number", 11),
    ("<lora:x:1,5>", "'1,5' is not a number", 8),
    ("<lora:x:1:2:3>", "too many values", 12),
    ("<lora: :1>", "needs a name", 0),
    ("ok <lora:x:dyn=8>", "unknown argument 'dyn'", 11),
    ("<hypernet:x:1>", "unknown extra network <hypernet:...>", 0),
])
def test_bad_extra_network_tags_say_where(prompt, words, position):
    with pytest.raises(PromptError) as info:
        parse_extra_networks(prompt)
    assert words in info.value.message
    assert info.value.position == position
