"""Prompt matrix: A1111's prompts for every combination of the '|' parts, one picture each (equal
to a single run of its prompt), and the grid with its on/off legends."""

import numpy as np
import pytest
from PIL import Image

from modules.generation import pipeline
from modules.generation.request import GenerationRequest
from modules.images import grids
from modules.scripts.library import ScriptLibrary
from modules.scripts.prompt_matrix import PromptMatrix, matrix_prompts
from modules.service.jobs import Job

REQUEST = GenerationRequest(prompt="a large star|red|on a blue background", steps=2, width=64, height=64, seed=21)
LIBRARY = ScriptLibrary([PromptMatrix()])


def pixels(image):
    return np.asarray(image.convert("RGB")).astype(int)


def matrix(ctx, request=REQUEST, args=(), save=False):
    return ctx.jobs.run(Job(), LIBRARY.job(ctx, "txt2img", "Prompt matrix", list(args)), ctx, request, save=save)


@pytest.mark.parametrize(("prompt", "at_start", "joiner", "prompts"), [
    ("a cat|red|big", False, ", ", ["a cat", "a cat, red", "a cat, big", "a cat, red, big"]),
    # The first part is kept as written, the variable ones stripped of spaces and commas.
    ("a cat | red, | big", False, ", ", ["a cat ", "a cat , red", "a cat , big", "a cat , red, big"]),
    ("a cat|red|big", True, ", ", ["a cat", "red, a cat", "big, a cat", "red, big, a cat"]),
    ("a cat|red|big", False, " ", ["a cat", "a cat red", "a cat big", "a cat red big"]),
    ("no bars", False, ", ", ["no bars"]),
])
def test_prompts_are_built_as_a1111_builds_them(prompt, at_start, joiner, prompts):
    parts, built = matrix_prompts(prompt, at_start, joiner)
    assert parts == prompt.split("|") and built == prompts


def test_every_combination_is_a_picture_in_a_grid_with_legends(builtin_ctx):
    result = matrix(builtin_ctx)
    grid, pictures = result.images[0], result.images[1:]
    prompts = ["a large star", "a large star, red", "a large star, on a blue background",
               "a large star, red, on a blue background"]
    assert len(pictures) == 2 ** 2 and [t.split("\n")[0] for t in result.infotexts[1:]] == prompts
    assert result.infotexts[0] == result.infotexts[1] and set(result.seeds) == {21}
    for picture, prompt in zip(pictures[:2], prompts):
        single = pipeline.generate(builtin_ctx, REQUEST.replace(prompt=prompt), save=False).images[0]
        assert np.array_equal(pixels(picture), pixels(single))

    # Two columns (red off, on) and two rows (blue background off, on), cells at the bottom right.
    pad_left, pad_top = grid.width - 2 * 64, grid.height - 2 * 64
    assert pad_left == 48 and pad_top > 0
    for i, picture in enumerate(pictures):
        x, y = pad_left + 64 * (i % 2), pad_top + 64 * (i // 2)
        assert np.array_equal(pixels(grid.crop((x, y, x + 64, y + 64))), pixels(picture))
    expected = grids.draw_prompt_matrix(Image.new("RGB", (128, 128)), 64, 64, REQUEST.prompt.split("|"))
    assert np.array_equal(pixels(grid)[:pad_top], pixels(expected)[:pad_top])
    # A part a column lacks is grey and struck through; one it has is black.
    off, on = (pixels(grid)[:pad_top, pad_left + 64 * c:pad_left + 64 * (c + 1)] for c in (0, 1))
    grey = (off == grids.INACTIVE).all(axis=-1).sum()
    assert grey > 20 and (off < 100).all(axis=-1).sum() == 0 and (on < 100).all(axis=-1).sum() > 20


def test_three_parts_make_eight_pictures_on_two_rows(builtin_ctx):
    request = REQUEST.replace(prompt="a star|red|big|in the center", steps=1)
    result = matrix(builtin_ctx, request, [False, True])
    pictures = result.images[1:]
    assert len(pictures) == 8 and result.seeds[1:] == [21 + i for i in range(8)]
    grid = result.images[0]
    assert grid.width == 48 + 4 * 64 and grid.height > 2 * 64


def test_the_negative_prompt_can_be_the_matrix(builtin_ctx):
    request = REQUEST.replace(prompt="a large star", negative_prompt="red|green", steps=1)
    job = Job()
    script = PromptMatrix()
    result = script.run(builtin_ctx, request, script.values([False, False, "negative", "space"]), job,
                        pipeline.generate, False)
    assert [r.split("\n")[1] for r in result.infotexts[1:]] == ["Negative prompt: red", "Negative prompt: red green"]
    assert job.step == job.total_steps == 2
