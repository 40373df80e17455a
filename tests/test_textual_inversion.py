"""Creating and training textual-inversion embeddings on a tiny model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from modules.prompting.tokenizer import tokenize
from modules.service.jobs import Job
from modules.training import textual_inversion as ti
from tests.tiny import tiny_family_model, tiny_sd_model


@pytest.fixture(scope="module")
def model():
    return tiny_sd_model(seed=5)


@pytest.fixture()
def dataset(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"plain, colour {i}")
    template = tmp_path / "template.txt"
    template.write_text("a picture of [name], [filewords]\n[name]\n")
    return folder, template


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_create_writes_init_text_vectors_and_reads_back(tmp_path, model, suffix):
    path = ti.create_embedding(model, tmp_path, "zork", init_text="red circle", vectors=3, suffix=suffix)
    assert path.name == f"zork{suffix}"
    vectors, step = ti.read_embedding(path)
    ids = tokenize(["red circle"])[0]
    table = ti.token_table(model).weight
    assert step == 0 and vectors.shape == (3, table.shape[1])
    assert torch.equal(vectors, table[[ids[0], ids[1], ids[0]]])  # init tokens repeated to fill


def test_a1111_pt_layout(tmp_path, model):
    path = ti.create_embedding(model, tmp_path, "layout", init_text="", vectors=2)
    data = torch.load(path, weights_only=True)
    assert set(data) >= {"string_to_token", "string_to_param", "name", "step"}
    assert data["name"] == "layout" and data["step"] == 0
    assert torch.equal(data["string_to_param"]["*"], torch.zeros(2, ti.token_table(model).embedding_dim))


def test_create_refuses_bad_names_and_existing_files(tmp_path, model):
    for name in ("", "two words", "../escape", ".hidden", "a/b"):
        with pytest.raises(ti.TrainingError, match="embedding name"):
            ti.create_embedding(model, tmp_path, name)
    with pytest.raises(ti.TrainingError, match="vectors per token"):
        ti.create_embedding(model, tmp_path, "many", vectors=76)
    ti.create_embedding(model, tmp_path, "once", init_text="cat")
    with pytest.raises(ti.TrainingError, match="already exists"):
        ti.create_embedding(model, tmp_path, "once", suffix=".safetensors")
    ti.create_embedding(model, tmp_path, "once", init_text="dog", suffix=".safetensors", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["once.safetensors"]


def test_damaged_embedding_is_named(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a pickle")
    with pytest.raises(ti.TrainingError, match="cannot read the embedding bad.pt"):
        ti.read_embedding(tmp_path / "bad.pt")


def test_prompt_row_places_vectors_where_the_name_is():
    row, slots = ti.prompt_row("a [name] and [name], [filewords]", "red", 2)
    a, and_, red = tokenize(["a"])[0], tokenize(["and"])[0], tokenize(["red"])[0]
    assert len(row) == 77 and row[0] == 49406 and row[-1] == 49407
    assert slots == [2, 3, 5, 6]
    assert row[1] == a[0] and row[4] == and_[0] and red[0] in row[7:10]


def test_vectors_equal_to_token_embeddings_give_the_plain_encoding(model):
    ids = tokenize(["a red circle"])[0]
    row = [49406, *ids, *[49407] * (76 - len(ids))]
    slots = [[2, 3]]
    vectors = ti.token_table(model).weight[ids[1:3]].detach()
    with torch.no_grad():
        ours = ti.encode_with_vectors(model, [row], slots, vectors)
        plain = model.encode_text(torch.tensor([row]))[0]
        assert torch.allclose(ours, plain, atol=1e-6)
        assert torch.allclose(ti.encode_with_vectors(model, [row], slots, vectors, clip_skip=2),
                              model.encode_text(torch.tensor([row]), clip_skip=2)[0], atol=1e-6)
        other = ti.encode_with_vectors(model, [row], slots, torch.randn_like(vectors))
        assert not torch.allclose(other, plain, atol=1e-3)


def _options(dataset, **changes):
    folder, template = dataset
    defaults = dict(learn_rate="0.05", size=32, steps=6, save_every=2, preview_every=0)
    return ti.TrainingOptions(embedding="zork", dataset=folder, template=template, **(defaults | changes))


def test_training_changes_only_the_embedding(tmp_path, model, dataset):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = ti.create_embedding(model, tmp_path, "zork", init_text="thing", vectors=2)
    start, _ = ti.read_embedding(path)
    result = ti.train_embedding(model, _options(dataset, batch_size=2, gradient_steps=2), embeddings_dir=tmp_path,
                                log_dir=tmp_path / "log", checkpoint_hash="abc", checkpoint_name="tiny")
    after, step = ti.read_embedding(path)
    assert (result.step, step, result.interrupted) == (6, 6, False)
    assert not torch.allclose(after, start)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.loss is not None and result.loss > 0
    copies = sorted(p.name for p in (tmp_path / "log").rglob("*.pt"))
    assert copies == ["zork-2.pt", "zork-4.pt"]


def test_training_works_on_sd2s_openclip_encoder(tmp_path, dataset):
    model = tiny_family_model("SD2", seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = ti.create_embedding(model, tmp_path, "zork", init_text="thing", vectors=2)
    start, _ = ti.read_embedding(path)
    assert start.shape == (2, model.text_width)
    result = ti.train_embedding(model, _options(dataset, steps=3, save_every=0), embeddings_dir=tmp_path,
                                log_dir=tmp_path / "log")
    after, step = ti.read_embedding(path)
    assert (result.step, step) == (3, 3) and not torch.allclose(after, start)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_vectors_slots_are_not_read_as_the_end_of_the_text():
    row, slots = ti.prompt_row("a [name] here", "", 3)
    assert all(row[s] != 49407 for s in slots) and row.index(49407) > max(slots)


def test_schedule_end_stops_training_and_resume_continues(tmp_path, model, dataset):
    ti.create_embedding(model, tmp_path, "zork", vectors=1)
    first = ti.train_embedding(model, _options(dataset, learn_rate="0.01:3"), embeddings_dir=tmp_path, log_dir=tmp_path)
    assert first.step == 3
    again = ti.train_embedding(model, _options(dataset, learn_rate="0.01:3, 0.001:5"), embeddings_dir=tmp_path, log_dir=tmp_path)
    assert again.step == 5


def test_interrupt_keeps_a_loadable_file_and_previews_are_saved(tmp_path, model, dataset):
    ti.create_embedding(model, tmp_path, "zork", vectors=1, suffix=".safetensors")
    job = Job()
    seen = []

    def preview(prompt, step):
        seen.append((prompt, step))
        if step == 2:
            job.interrupt()
        return Image.new("RGB", (8, 8), (step, 0, 0))

    result = ti.train_embedding(model, _options(dataset, preview_every=1, steps=50), embeddings_dir=tmp_path,
                                log_dir=tmp_path / "log", job=job, preview=preview)
    assert result.interrupted and result.step == 2
    assert ti.read_embedding(tmp_path / "zork.safetensors")[1] == 2
    assert seen[0] == ("a picture of zork, plain, colour 0", 1)
    assert [p.name for p in result.previews] == ["zork-1.png", "zork-2.png"]
    with Image.open(result.previews[1]) as image:
        assert image.getpixel((0, 0)) == (2, 0, 0)
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_bad_options_are_reported_together(tmp_path, dataset):
    folder, template = dataset
    options = ti.TrainingOptions(embedding="x y", dataset=folder, template=template, learn_rate="fast",
                                 batch_size=0, tag_dropout=2.0)
    with pytest.raises(ti.TrainingError) as error:
        options.validate()
    message = str(error.value)
    assert "batch_size" in message and "tag_dropout" in message and "learning rate" in message


def test_missing_embedding_and_wrong_size(tmp_path, model, dataset):
    with pytest.raises(ti.TrainingError, match="no embedding named zork"):
        ti.train_embedding(model, _options(dataset), embeddings_dir=tmp_path, log_dir=tmp_path)
    ti.save_embedding(tmp_path / "zork.pt", torch.zeros(1, 7), step=0)
    with pytest.raises(ti.TrainingError, match="vectors of size 7"):
        ti.train_embedding(model, _options(dataset), embeddings_dir=tmp_path, log_dir=tmp_path)


def test_a_template_line_without_the_name_is_refused(tmp_path, model, dataset):
    folder, template = dataset
    template.write_text("a picture of [name]\na plain picture\n")
    ti.create_embedding(model, tmp_path, "zork")
    with pytest.raises(ti.TrainingError, match="needs \\[name\\].*'a plain picture'"):
        ti.train_embedding(model, _options(dataset), embeddings_dir=tmp_path, log_dir=tmp_path)


def test_training_puts_each_part_on_the_device_while_it_works(tmp_path, model, dataset):
    """Under --medvram a part is on the GPU only inside `using(part)`: the pictures are encoded
    inside the VAE's, and each step's forward and backward passes inside the text encoder's and
    the UNet's. The parts used change nothing in the result."""
    import contextlib

    entered, inside = [], set()

    @contextlib.contextmanager
    def using(part):
        entered.append(part)
        inside.add(part)
        try:
            yield
        finally:
            inside.discard(part)

    encode, forward = model.first_stage_model.encode, model.apply_model
    seen = []
    model.first_stage_model.encode = lambda x: (seen.append(("vae", set(inside))), encode(x))[1]
    model.apply_model = lambda *a, **k: (seen.append(("unet", set(inside))), forward(*a, **k))[1]
    try:
        ti.create_embedding(model, tmp_path, "zork", init_text="thing", vectors=2)
        ti.train_embedding(model, _options(dataset, steps=2, save_every=0, gradient_steps=2), embeddings_dir=tmp_path,
                           log_dir=tmp_path / "log", using=using)
    finally:
        del model.first_stage_model.encode, model.apply_model
    offloaded, _ = ti.read_embedding(tmp_path / "zork.pt")
    assert entered == ["vae"] + ["text", "unet"] * 4
    assert seen == [("vae", {"vae"})] * 3 + [("unet", {"text", "unet"})] * 4

    ti.create_embedding(model, tmp_path, "zork", init_text="thing", vectors=2, overwrite=True)
    ti.train_embedding(model, _options(dataset, steps=2, save_every=0, gradient_steps=2), embeddings_dir=tmp_path,
                       log_dir=tmp_path / "log")
    assert torch.equal(ti.read_embedding(tmp_path / "zork.pt")[0], offloaded)


def test_training_under_lowvram_is_refused_with_the_reason(ctx, dataset):
    import dataclasses

    ctx.models.policy = dataclasses.replace(ctx.models.policy, offload="lowvram")
    with pytest.raises(ti.TrainingError, match="--lowvram.*--medvram works"):
        ti.train_in_app(ctx, _options(dataset))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("medvram", [False, True])
def test_training_on_the_gpu(tmp_path, dataset, medvram):
    from safetensors.torch import save_file

    from modules.app.config import Flags
    from modules.context import AppContext

    folder = tmp_path / "models" / "Stable-diffusion"  # the dataset is in tmp_path too, where training may read
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tiny_sd_model(seed=5).state_dict().items()}, folder / "tiny.safetensors")
    ctx = AppContext.create(Flags(data_dir=tmp_path, device="cuda", medvram=medvram))
    sd_model = ctx.models.get()
    start = ti.read_embedding(ti.create_embedding(sd_model, ctx.paths.embeddings, "zork", init_text="thing", vectors=2))[0]
    result = ti.train_in_app(ctx, _options(dataset, steps=4, save_every=0))
    after, step = ti.read_embedding(result.path)
    assert step == 4 and result.loss is not None and torch.isfinite(after).all() and not torch.equal(after, start)
    assert next(sd_model.model.parameters()).device.type == ("cpu" if medvram else "cuda")


def test_training_under_medvram_leaves_nothing_on_the_device(ctx, dataset):
    """Medvram keeps the part after the one in use (a step ends with the UNet, the decode's turn
    next), so the training job takes everything off the device when it ends."""
    import dataclasses

    from modules.models.memory import DevicePolicy, ModelManager

    cpu = torch.device("cpu")
    ctx = dataclasses.replace(ctx, models=ModelManager(ctx.paths, DevicePolicy(cpu, torch.float32, torch.float32, "medvram")))
    ti.create_embedding(ctx.models.get(), ctx.paths.embeddings, "zork", init_text="thing", vectors=2)
    result = ti.train_in_app(ctx, _options(dataset, steps=2, save_every=0))
    assert result.step == 2 and ctx.models._mover.resident == []
