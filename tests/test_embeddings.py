"""Textual-inversion embeddings: the three file layouts, their place in the conditioning, the
folder kept in step with the files, and files that cannot be used."""

import logging
import os

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from modules.api import routes
from modules.generation import pipeline
from modules.generation.request import GenerationRequest
from modules.models.loader import full_hash
from modules.networks.embeddings import EmbeddingDatabase, EmbeddingTable, read_embedding
from modules.prompting.conditioning import (
    CHUNK_TOKENS,
    PLACEHOLDER_ID,
    embeddings_used,
    encode_prompts,
    prompt_chunks,
    token_count,
)
from modules.prompting.tokenizer import tokenize
from tests.tiny import tiny_sd_model

WIDTH = 32  # the tiny text encoder's
CAT, DOG, RED = (ids[0] for ids in tokenize(["cat", "dog", "red"]))


@pytest.fixture(scope="module")
def model():
    return tiny_sd_model(seed=0)


def token_vectors(model, *ids):
    """The text encoder's own input vectors of these tokens: an embedding made of them must
    condition exactly like the words."""
    return model.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight[list(ids)].clone()


def write_a1111_pt(path, vectors, **info):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, **info}, path)


def write_parameterdict_pt(path, vectors):
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)})
    torch.save({"string_to_param": params, "step": 3000}, path)


def write_safetensors(path, vectors):
    save_file({"emb_params": vectors.contiguous()}, path)


def write_diffusers_bin(path, vectors):
    torch.save({"<concept>": vectors[0]}, path)  # one vector, without the count dimension


WRITERS = {
    ".pt": write_a1111_pt,
    "-old.pt": write_parameterdict_pt,
    ".safetensors": write_safetensors,
    ".bin": write_diffusers_bin,
}


def encode(model, prompt, table=None, steps=10):
    c = encode_prompts(model, [prompt], [""], steps, 1, embeddings=table)
    return c.cond[0][0][0].at(1)


# ---- files ----


@pytest.mark.parametrize("suffix", WRITERS)
def test_each_layout_round_trips(tmp_path, suffix):
    vectors = torch.randn(1 if suffix == ".bin" else 3, WIDTH)
    path = tmp_path / f"style{suffix}"
    WRITERS[suffix](path, vectors)
    embedding = read_embedding(path)
    assert embedding.name == path.stem
    assert torch.equal(embedding.vectors, vectors)
    assert (embedding.count, embedding.width) == tuple(vectors.shape)
    assert embedding.sha256 == full_hash(path) and embedding.shorthash == full_hash(path)[:12]


def test_training_facts_are_kept(tmp_path):
    path = tmp_path / "trained.pt"
    write_a1111_pt(path, torch.randn(2, WIDTH), step=1500, sd_checkpoint="abcdef12", sd_checkpoint_name="v1-5")
    e = read_embedding(path)
    assert (e.step, e.sd_checkpoint, e.sd_checkpoint_name) == (1500, "abcdef12", "v1-5")
    assert read_embedding(tmp_path / "trained.pt").step == 1500
    write_parameterdict_pt(tmp_path / "old.pt", torch.randn(1, WIDTH))
    assert read_embedding(tmp_path / "old.pt").step == 3000


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("name, write, words", [
    ("garbage.pt", lambda p: p.write_bytes(b"not a pickle at all"), "not a readable"),
    ("garbage.safetensors", lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken"), "not a readable"),
    ("evil.pt", lambda p: torch.save({"string_to_param": {"*": RunsCode()}}, p), "names posix.system"),
    ("two.pt", lambda p: torch.save({"string_to_param": {"a": torch.randn(1, WIDTH), "b": torch.randn(1, WIDTH)}}, p), "holds 2"),
    ("listed.pt", lambda p: torch.save([torch.randn(1, WIDTH)], p), "not a dictionary"),
    ("model.safetensors", lambda p: save_file({"a.weight": torch.randn(2, 2), "b.weight": torch.randn(2)}, p), "holds 2"),
    ("sdxl.safetensors", lambda p: save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(2, 1280)}, p),
     "1 clip_l vectors but 2 clip_g"),
    ("long.pt", lambda p: write_a1111_pt(p, torch.randn(76, WIDTH)), "at most 75"),
    ("nan.safetensors", lambda p: write_safetensors(p, torch.full((1, WIDTH), float("nan"))), "NaN"),
    ("ints.bin", lambda p: torch.save({"<x>": torch.ones(2, WIDTH, dtype=torch.int64)}, p), "floats"),
    ("other.pt", lambda p: torch.save({"state": {"x": 1}, "meta": "y"}, p), "not a textual-inversion embedding"),
])
def test_unusable_files_are_reported_not_raised(tmp_path, caplog, name, write, words):
    write(tmp_path / name)
    write_a1111_pt(tmp_path / "good.pt", torch.randn(1, WIDTH))
    db = EmbeddingDatabase(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert list(db.embeddings()) == ["good"]
    assert list(db.problems()) == [name]
    assert words in db.problems()[name]
    assert name in caplog.text


# ---- the folder ----


def test_folder_changes_are_picked_up(tmp_path):
    db = EmbeddingDatabase(tmp_path / "embeddings")
    assert db.embeddings() == {}  # no folder yet
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    write_a1111_pt(folder / "first.pt", torch.zeros(1, WIDTH))
    (folder / "notes.txt").write_text("not an embedding")
    assert list(db.embeddings()) == ["first"]
    first = db.embeddings()["first"]
    assert db.embeddings()["first"] is first  # unchanged files are not read again

    write_safetensors(folder / "sub" / "second.safetensors", torch.ones(2, WIDTH))
    assert set(db.embeddings()) == {"first", "second"}
    write_a1111_pt(folder / "first.pt", torch.full((3, WIDTH), 2.0))
    os.utime(folder / "first.pt", ns=(1, 10**18))  # a new modification time even on coarse clocks
    assert db.embeddings()["first"].count == 3
    (folder / "sub" / "second.safetensors").unlink()
    assert list(db.embeddings()) == ["first"]


def test_same_name_twice_keeps_one_and_says_so(tmp_path):
    write_a1111_pt(tmp_path / "Twin.pt", torch.zeros(1, WIDTH))
    write_safetensors(tmp_path / "twin.safetensors", torch.ones(1, WIDTH))
    db = EmbeddingDatabase(tmp_path)
    assert list(db.embeddings()) == ["Twin"]
    assert "same name as Twin.pt" in db.problems()["twin.safetensors"]


def test_wrong_width_is_skipped_with_a_message(tmp_path, caplog):
    write_a1111_pt(tmp_path / "fits.pt", torch.randn(1, WIDTH))
    write_a1111_pt(tmp_path / "sd2.pt", torch.randn(1, 1024))
    db = EmbeddingDatabase(tmp_path)
    loaded, skipped = db.split(WIDTH)
    assert list(loaded) == ["fits"] and list(skipped) == ["sd2"]
    assert set(db.split(None)[0]) == {"fits", "sd2"}
    with caplog.at_level(logging.WARNING):
        table = db.table(WIDTH)
    assert "sd2" in caplog.text and "1024 wide" in caplog.text and "takes 32" in caplog.text
    assert table.match(tokenize(["sd2"])[0], 0) is None
    assert table.match(tokenize(["fits"])[0], 0)[0].name == "fits"


# ---- conditioning ----


@pytest.mark.parametrize("suffix", WRITERS)
def test_an_embedding_of_word_vectors_conditions_like_the_words(tmp_path, model, suffix):
    """Each layout, end to end: an embedding holding the encoder's own vectors of "cat" gives
    exactly the conditioning of the word, so the vectors land where the name stood."""
    path = tmp_path / f"kitty{suffix}"
    WRITERS[suffix](path, token_vectors(model, CAT))
    table = EmbeddingDatabase(tmp_path).table(WIDTH)
    with torch.no_grad():
        by_embedding = encode(model, f"a photo of ({path.stem}:1.2), outdoors", table)
        by_word = encode(model, "a photo of (cat:1.2), outdoors")
        without = encode(model, f"a photo of ({path.stem}:1.2), outdoors")
    assert torch.allclose(by_embedding, by_word, atol=1e-6)
    assert not torch.allclose(by_embedding, without, atol=1e-3)  # the table is what changed it


def test_multi_vector_embedding_takes_n_positions(tmp_path, model):
    write_a1111_pt(tmp_path / "pets.pt", token_vectors(model, CAT, DOG, RED))
    table = EmbeddingDatabase(tmp_path).table(WIDTH)
    [chunk], count = prompt_chunks("a pets b", embeddings=table)
    a, b = (ids[0] for ids in tokenize(["a", "b"]))
    assert chunk.tokens[:6] == (49406, a, PLACEHOLDER_ID, PLACEHOLDER_ID, PLACEHOLDER_ID, b)
    assert [(position, e.name) for position, e in chunk.fixes] == [(2, "pets")]
    assert count == 5 and token_count("a pets b", embeddings=table) == 5
    with torch.no_grad():
        assert torch.allclose(encode(model, "a pets b", table), encode(model, "a cat dog red b"), atol=1e-6)


def test_an_embedding_is_never_split_between_chunks(tmp_path, model):
    write_a1111_pt(tmp_path / "pets.pt", token_vectors(model, CAT, DOG, RED))
    table = EmbeddingDatabase(tmp_path).table(WIDTH)
    first, second = prompt_chunks("x " * 73 + "pets", comma_backtrack=0, embeddings=table)[0]
    assert first.fixes == () and first.tokens[74:] == (49407,) * 3  # 73 words, then padding
    assert [p for p, _ in second.fixes] == [1] and second.tokens[1:4] == (PLACEHOLDER_ID,) * 3
    with torch.no_grad():
        z = encode(model, "x " * 73 + "pets", table)
    assert z.shape == (154, WIDTH)


def test_an_embedding_moves_with_the_words_after_a_comma(tmp_path, model):
    write_a1111_pt(tmp_path / "pets.pt", token_vectors(model, CAT, DOG))
    table = EmbeddingDatabase(tmp_path).table(WIDTH)
    prompt = "x " * 70 + ", pets y y y y"
    first, second = prompt_chunks(prompt, embeddings=table)[0]
    assert first.fixes == () and len(first.tokens) == CHUNK_TOKENS + 2
    assert [p for p, _ in second.fixes] == [1]
    with torch.no_grad():
        assert torch.allclose(encode(model, prompt, table), encode(model, "x " * 70 + ", cat dog y y y y"), atol=1e-6)


def test_longest_name_wins(tmp_path, model):
    write_a1111_pt(tmp_path / "blue.pt", token_vectors(model, CAT))
    write_a1111_pt(tmp_path / "blue_sky.pt", token_vectors(model, DOG))
    table = EmbeddingDatabase(tmp_path).table(WIDTH)
    [chunk], _ = prompt_chunks("blue_sky and blue", embeddings=table)
    assert [e.name for _, e in chunk.fixes] == ["blue_sky", "blue"]


def test_embeddings_used_follow_the_schedule(tmp_path, model):
    write_a1111_pt(tmp_path / "early.pt", torch.randn(1, WIDTH))
    write_a1111_pt(tmp_path / "late.pt", torch.randn(1, WIDTH))
    write_a1111_pt(tmp_path / "unused.pt", torch.randn(1, WIDTH))
    table = EmbeddingDatabase(tmp_path).table(WIDTH)
    used = embeddings_used(["a [early:late:0.5] b", "late"], 10, table)
    assert [e.name for e in used] == ["early", "late"]
    assert embeddings_used(["a [early:late:0.5] b"], 10, EmbeddingTable([])) == []


# ---- generation, infotext and API ----


def test_generation_uses_the_folder_and_records_ti_hashes(ctx):
    request = GenerationRequest(prompt="a red kitty", negative_prompt="blurry", steps=2, width=64, height=64, seed=3)
    plain = pipeline.generate(ctx, request, save=False)
    assert "TI hashes" not in plain.infotexts[0]
    write_a1111_pt(ctx.paths.embeddings / "kitty.pt", torch.randn(2, WIDTH) * 3)
    write_safetensors(ctx.paths.embeddings / "blurry.safetensors", torch.randn(1, WIDTH) * 3)
    result = pipeline.generate(ctx, request, save=False)
    kitty, blurry = (full_hash(ctx.paths.embeddings / n)[:12] for n in ("kitty.pt", "blurry.safetensors"))
    assert result.infotexts[0].endswith(f'TI hashes: "kitty: {kitty}, blurry: {blurry}"')
    assert result.images[0].tobytes() != plain.images[0].tobytes()


def test_embeddings_api_has_a1111s_shape(ctx):
    write_a1111_pt(ctx.paths.embeddings / "fits.pt", torch.randn(2, WIDTH), step=40, sd_checkpoint_name="tiny")
    write_a1111_pt(ctx.paths.embeddings / "sd1.pt", torch.randn(1, 768))
    (ctx.paths.embeddings / "broken.pt").write_bytes(b"junk")
    ctx.models.get()
    app = FastAPI()
    routes.install(app, ctx)
    body = TestClient(app).get("/sdapi/v1/embeddings").json()
    assert body == {
        "loaded": {"fits": {"step": 40, "sd_checkpoint": None, "sd_checkpoint_name": "tiny", "shape": WIDTH, "vectors": 2}},
        "skipped": {"sd1": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 768, "vectors": 1}},
    }
