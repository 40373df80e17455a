import pytest
import torch

from modules.prompting.conditioning import (
    CONTEXT_TOKENS,
    EMPTY_CHUNK,
    Conditioning,
    ScheduledCond,
    encode_prompts,
    prompt_chunks,
    token_count,
)
from modules.prompting.prompt_parser import PromptError
from modules.prompting.tokenizer import BOS_ID, EOS_ID, tokenize
from tests.tiny import tiny_sd_model

HIDDEN = 32  # tiny CLIP width
COMMA = 267
CAT, DOG = (ids[0] for ids in tokenize(["cat", "dog"]))


@pytest.fixture(scope="module")
def model():
    return tiny_sd_model(seed=0)


class CountingModel:
    """The tiny model, counting the rows that go through its text encoder."""

    def __init__(self, model):
        self.model = model
        self.text_model = model.text_model
        self.rows = 0

    def encode_text(self, tokens, clip_skip, replace=()):
        self.rows += tokens.shape[0]
        return self.model.encode_text(tokens, clip_skip, replace)


def raw(model, chunk_tokens, clip_skip=1):
    """The text encoder's plain output for one chunk."""
    return model.encode_text(torch.tensor([chunk_tokens]), clip_skip)[0][0]


def one(model, prompt, negative="", steps=10, clip_skip=1) -> tuple[ScheduledCond, ScheduledCond]:
    c = encode_prompts(model, [prompt], [negative], steps, clip_skip)
    [[(cond, weight)]] = c.cond
    assert weight == 1.0
    return cond, c.uncond[0]


def close(a, b):
    return torch.allclose(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ chunks

def test_short_prompt_is_one_chunk():
    [chunk], count = prompt_chunks("cat dog")
    assert chunk.tokens == (BOS_ID, CAT, DOG) + (EOS_ID,) * 74
    assert chunk.weights == (1.0,) * CONTEXT_TOKENS
    assert count == 2


def test_empty_prompt_is_the_empty_chunk():
    assert prompt_chunks("") == ([EMPTY_CHUNK], 0)


@pytest.mark.parametrize("n, chunks", [(75, 1), (76, 2), (150, 2), (151, 3)])
def test_75_tokens_per_chunk(n, chunks):
    result, count = prompt_chunks("cat " * n)
    assert len(result) == chunks and count == n
    assert all(len(c.tokens) == CONTEXT_TOKENS and c.tokens[0] == BOS_ID and c.tokens[-1] == EOS_ID for c in result)
    assert sum(t == CAT for c in result for t in c.tokens) == n


def test_words_after_a_near_comma_move_to_the_next_chunk():
    first, second = prompt_chunks("cat " * 70 + ", " + "dog " * 10)[0]
    assert first.tokens[1:72] == (CAT,) * 70 + (COMMA,)
    assert first.tokens[72:] == (EOS_ID,) * 5
    assert second.tokens[1:12] == (DOG,) * 10 + (EOS_ID,)


def test_no_backtrack_when_the_comma_is_far_or_backtrack_is_off():
    first, _ = prompt_chunks("cat " * 50 + ", " + "dog " * 30)[0]
    assert first.tokens[1:76] == (CAT,) * 50 + (COMMA,) + (DOG,) * 24
    first, _ = prompt_chunks("cat " * 70 + ", " + "dog " * 10, comma_backtrack=0)[0]
    assert first.tokens[1:76] == (CAT,) * 70 + (COMMA,) + (DOG,) * 4


def test_break_starts_a_new_chunk():
    chunks, count = prompt_chunks("cat BREAK dog")
    assert [c.tokens[:3] for c in chunks] == [(BOS_ID, CAT, EOS_ID), (BOS_ID, DOG, EOS_ID)]
    assert count == 75 + 1
    assert len(prompt_chunks("cat BREAK")[0]) == 1
    assert len(prompt_chunks("cat BREAK BREAK dog")[0]) == 3


def test_weights_follow_their_tokens():
    [chunk], _ = prompt_chunks("(cat:1.5) [dog]")
    assert chunk.tokens[1:3] == (CAT, DOG)
    assert chunk.weights[:4] == (1.0, 1.5, 1 / 1.1, 1.0)


def test_token_count_is_the_most_over_parts_and_steps():
    assert token_count("cat dog") == 2
    assert token_count("[cat:cat cat cat:0.5] AND dog") == 3
    assert token_count("cat " * 80) == 80


# ---------------------------------------------------------------------------------- encoding

def test_short_prompt_shape(model):
    cond, uncond = one(model, "a cat")
    assert cond.at(1).shape == uncond.at(1).shape == (77, HIDDEN)


def test_long_prompt_has_two_chunks_and_uncond_is_padded(model):
    cond, uncond = one(model, "cat " * 100)
    assert cond.at(1).shape == uncond.at(1).shape == (154, HIDDEN)
    empty = raw(model, EMPTY_CHUNK.tokens)
    assert close(uncond.at(1)[:77], empty) and close(uncond.at(1)[77:], empty)


def test_long_negative_pads_the_prompt(model):
    cond, uncond = one(model, "a cat", negative="dog " * 200)
    assert cond.at(1).shape == uncond.at(1).shape == (231, HIDDEN)


def test_chunks_are_encoded_separately(model):
    cond, _ = one(model, "a cat BREAK a dog")
    [cat], [dog] = prompt_chunks("a cat")[0], prompt_chunks("a dog")[0]
    assert cond.at(1).shape == (154, HIDDEN)
    assert close(cond.at(1)[:77], raw(model, cat.tokens))
    assert close(cond.at(1)[77:], raw(model, dog.tokens))


def test_weight_scales_the_token_and_keeps_the_mean(model):
    cond, _ = one(model, "(cat:1.5) dog")
    [chunk], _ = prompt_chunks("(cat:1.5) dog")
    base = raw(model, chunk.tokens)
    z = cond.at(1)
    assert close(z.mean(), base.mean())
    # every token is rescaled by the same factor, the weighted one by 1.5 more
    factor = z[2] / base[2]
    assert torch.allclose(factor, factor[0].expand_as(factor), atol=1e-4)
    assert close(z[1], base[1] * 1.5 * factor[0])
    assert close(z[5], base[5] * factor[0])
    # larger deviation than the mean-preserving unweighted baseline
    assert (z[1] - base[1] * factor[0]).norm() > 0.4 * (base[1] * factor[0]).norm()


@pytest.mark.parametrize("prompt, steps, n_cat, n_dog", [("[(cat:2):dog:3]", 10, 1, 1), ("[(cat:2)|dog|dog]", 3, 1, 2)])
def test_weights_are_normalised_over_a_prompts_schedule(model, prompt, steps, n_cat, n_dog):
    """A1111 encodes the texts of one prompt's schedule (one per entry; alternation repeats
    them) as a batch and restores the mean over the whole batch."""
    cond, _ = one(model, prompt, steps=steps)
    [weighted], [plain] = prompt_chunks("(cat:2)")[0], prompt_chunks("dog")[0]
    z_cat, z_dog = raw(model, weighted.tokens), raw(model, plain.tokens)
    w = torch.tensor(weighted.weights).unsqueeze(-1)
    batch = torch.stack([z_cat] * n_cat + [z_dog] * n_dog)
    scaled = torch.stack([z_cat * w] * n_cat + [z_dog] * n_dog)
    factor = batch.mean() / scaled.mean()
    assert close(cond.at(1), z_cat * w * factor)
    assert close(cond.at(steps), z_dog * factor)


def test_schedule_switches_at_the_right_step(model):
    cond, _ = one(model, "a [dog:cat:3]", steps=10)
    dog, _ = one(model, "a dog")
    cat, _ = one(model, "a cat")
    assert [end for end, _ in cond.entries] == [3, 10]
    for step in (0, 1, 2, 3):
        assert close(cond.at(step), dog.at(step))
    for step in (4, 7, 10, 11):
        assert close(cond.at(step), cat.at(step))


def test_alternation_and_negative_schedules(model):
    c = encode_prompts(model, ["[cat|dog]"], ["[ugly:blurry:0.5]"], 4, 1)
    cond, uncond = c.cond[0][0][0], c.uncond[0]
    assert [end for end, _ in cond.entries] == [1, 2, 3, 4]
    assert cond.at(1) is cond.at(3) and not close(cond.at(1), cond.at(2))
    assert [end for end, _ in uncond.entries] == [2, 4]


def test_clip_skip_is_honoured(model):
    [chunk], _ = prompt_chunks("a cat")
    skip1, _ = one(model, "a cat", clip_skip=1)
    skip2, _ = one(model, "a cat", clip_skip=2)
    assert close(skip1.at(1), raw(model, chunk.tokens, 1))
    assert close(skip2.at(1), raw(model, chunk.tokens, 2))
    assert not close(skip1.at(1), skip2.at(1))


def test_composable_parts_with_weights(model):
    c = encode_prompts(model, ["a cat :1.2 AND " + "dog " * 90 + ":0.8"], ["x"], 10, 1)
    [[(cat, w_cat), (dog, w_dog)]] = c.cond
    assert (w_cat, w_dog) == (1.2, 0.8)
    assert cat.shape == dog.shape == c.uncond[0].shape == (154, HIDDEN)
    alone, _ = one(model, "a cat")
    assert close(cat.at(1)[:77], alone.at(1))


def test_identical_prompts_are_encoded_once(model):
    counting = CountingModel(model)
    c = encode_prompts(counting, ["a cat"] * 3, [""] * 3, 20, 1)
    assert isinstance(c, Conditioning)
    assert counting.rows == 2  # "a cat" and the empty prompt
    assert c.cond[0][0][0] is c.cond[2][0][0] and c.uncond[0] is c.uncond[1]


def test_padding_reuses_the_encoded_empty_chunk(model):
    counting = CountingModel(model)
    c = encode_prompts(counting, ["cat " * 100], ["ugly"], 20, 1)
    assert counting.rows == 4  # two chunks, "ugly", the empty chunk
    assert c.uncond[0].shape == (154, HIDDEN)


def test_empty_batch(model):
    assert encode_prompts(model, [], [], 20, 1) == Conditioning(cond=[], uncond=[])


def test_batch_of_different_prompts(model):
    c = encode_prompts(model, ["a cat", "dog " * 80], ["", "ugly"], 10, 1)
    assert len(c.cond) == len(c.uncond) == 2
    shapes = {sc.at(s).shape for parts in c.cond for sc, _ in parts for s in range(11)}
    shapes |= {u.at(s).shape for u in c.uncond for s in range(11)}
    assert shapes == {(154, HIDDEN)}


def test_bad_input_is_reported(model):
    with pytest.raises(ValueError, match="negative"):
        encode_prompts(model, ["a", "b"], [""], 10, 1)
    with pytest.raises(PromptError):
        encode_prompts(model, ["(cat:1.2.3)"], [""], 10, 1)


def test_scheduled_cond_at():
    a, b = torch.zeros(77, 4), torch.ones(77, 4)
    sc = ScheduledCond([(3, a), (10, b)])
    assert [sc.at(s) is a for s in (0, 1, 3)] == [True] * 3
    assert [sc.at(s) is b for s in (4, 10, 12)] == [True] * 3
    assert sc.shape == (77, 4)
    with pytest.raises(ValueError):
        ScheduledCond([])
    with pytest.raises(ValueError):
        ScheduledCond([(5, a), (5, b)])
