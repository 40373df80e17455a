"""Offload modes (--medvram, --lowvram), channels-last weights and --compile.

On the CPU the device is the CPU itself: parts and blocks go through the same bookkeeping (what is
uploaded, prefetched and evicted, in which order) without moving. The tests marked gpu check what
only CUDA shows: tensors moving to and from page-locked homes on a side stream, pictures bit for
bit against the default mode, peak memory, and a compiled UNet on the GPU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from modules.app.config import Flags, Paths, parse_flags
from modules.context import AppContext
from modules.generation import pipeline
from modules.generation.request import GenerationRequest
from modules.models import detect, loader, memory
from modules.models.memory import PARTS, DevicePolicy, ModelManager, WeightMover
from modules.models.sd_model import build_model
from tests.test_lora import CONV_3X3, kohya_tensors
from tests.tiny import tiny_family_model, tiny_sd_model

CPU = torch.device("cpu")


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def with_policy(ctx: AppContext, offload: str) -> AppContext:
    """`ctx` with a model manager of its own, in float32 on the CPU, in the given offload mode."""
    return dataclasses.replace(ctx, models=ModelManager(ctx.paths, DevicePolicy(CPU, torch.float32, torch.float32, offload)))


def recording(manager: ModelManager, log: list) -> None:
    """Makes `manager.using` log, inside each part and after it, which parts are on the device."""
    real = manager.using

    def on_device(model) -> list[str]:
        names = {getattr(model, attribute): part for part, attribute in PARTS.items()}
        return sorted(names[module] for module in manager._mover.resident)

    @contextlib.contextmanager
    def using(model, part):
        with real(model, part):
            log.append((part, on_device(model)))
            yield
        log.append((f"/{part}", on_device(model)))

    manager.using = using


def spy_on_movers(monkeypatch, calls: list) -> None:
    """Logs (method, module, how many modules its mover had on the device before) for each
    upload, ready and evict of every WeightMover."""
    for name in ("upload", "ready", "evict"):
        def logged(self, module, real=getattr(WeightMover, name), name=name):
            calls.append((name, module, len(self.resident)))
            return real(self, module)

        monkeypatch.setattr(WeightMover, name, logged)


# -- the policy ----------------------------------------------------------------------------------

def test_channels_last_where_convolutions_run_faster_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = DevicePolicy.from_flags(Flags(device="cuda"))
    assert on_gpu.dtype == torch.float16 and not on_gpu.channels_last
    assert DevicePolicy.from_flags(Flags(device="cpu"), fast_bf16=lambda: True).channels_last
    assert not DevicePolicy.from_flags(Flags(device="cpu"), fast_bf16=lambda: False).channels_last


def test_the_compile_flag_reaches_the_policy_and_refuses_what_it_cannot_go_with(monkeypatch, capsys):
    assert parse_flags(["--compile"]).compile == "default" and parse_flags([]).compile is None
    assert parse_flags(["--compile", "reduce-overhead"]).compile == "reduce-overhead"
    with pytest.raises(SystemExit):
        parse_flags(["--compile", "max-autotune"])
    assert "invalid choice" in capsys.readouterr().err
    assert DevicePolicy.from_flags(Flags(device="cpu", compile="default")).compile == "default"
    assert DevicePolicy.from_flags(Flags(device="cpu")).compile is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert DevicePolicy.from_flags(Flags(device="cuda", medvram=True, compile="default")).compile == "default"
    with pytest.raises(SystemExit, match="--compile does not go with --lowvram"):
        DevicePolicy.from_flags(Flags(device="cuda", lowvram=True, compile="default"))
    with pytest.raises(SystemExit, match="reduce-overhead does not go with --medvram"):
        DevicePolicy.from_flags(Flags(device="cuda", medvram=True, compile="reduce-overhead"))


# -- medvram and lowvram, with the CPU standing in for the GPU -------------------------------------

def test_the_offload_modes_give_the_default_pictures_and_leave_nothing_on_the_device(ctx):
    request = GenerationRequest(prompt="a kitty", negative_prompt="blurry", steps=6, width=64, height=64, seed=2)
    assert ctx.settings.live_preview_every == 5  # a preview decode inside sampling
    logs, pictures = {}, {}
    for offload in ("none", "medvram", "lowvram"):
        moded = with_policy(ctx, offload)
        if offload != "none":
            recording(moded.models, logs.setdefault(offload, []))
        pictures[offload] = pipeline.generate(moded, request, save=False).images[0].tobytes()
    assert pictures["medvram"] == pictures["none"] and pictures["lowvram"] == pictures["none"]
    # medvram: the next part uploads beside the current one; the preview's decode keeps the UNet.
    assert logs["medvram"] == [
        ("text", ["text", "unet"]), ("/text", ["unet"]),
        ("unet", ["unet", "vae"]), ("vae", ["unet", "vae"]), ("/vae", ["unet", "vae"]), ("/unet", ["vae"]),
        ("vae", ["vae"]), ("/vae", []),
    ]
    # lowvram: one part at a time; the UNet moves block by block instead.
    assert logs["lowvram"] == [
        ("text", ["text"]), ("/text", []), ("unet", []), ("vae", ["vae"]), ("/vae", []), ("/unet", []),
        ("vae", ["vae"]), ("/vae", []),
    ]


def test_an_error_inside_a_part_leaves_only_the_parts_still_in_use(ctx):
    manager = with_policy(ctx, "medvram").models
    model = manager.get()
    with pytest.raises(RuntimeError, match="boom"), manager.using(model, "unet"):
        with pytest.raises(RuntimeError, match="boom"), manager.using(model, "vae"):
            raise RuntimeError("boom")
        assert manager._mover.resident == [model.model]
        raise RuntimeError("boom")
    assert manager._mover.resident == []


def test_lowvram_streams_every_block_in_order_and_uploads_the_next_beside_it(tiny_data_dir, monkeypatch):
    calls = []
    spy_on_movers(monkeypatch, calls)
    policy = DevicePolicy(CPU, torch.float32, torch.float32, "lowvram")
    streamed = ModelManager(Paths(tiny_data_dir), policy).get()
    unet = streamed.model.diffusion_model
    units = memory.stream_units(unet)
    assert units == [unet.time_embed, *unet.input_blocks, unet.middle_block, *unet.output_blocks, unet.out]
    plain = ModelManager(Paths(tiny_data_dir), DevicePolicy(CPU, torch.float32, torch.float32, "none")).get()
    g = torch.Generator().manual_seed(0)
    x, context, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        expected = plain.apply_model(x, t, context)
        for forward in range(2):
            calls.clear()
            assert torch.equal(streamed.apply_model(x, t, context), expected)
            readied = [module for name, module, _ in calls if name == "ready"]
            assert readied == units  # every block, once, in order
            assert max(resident for _, _, resident in calls) <= 2  # the block at work and the next
            if forward:  # the order learnt: each block's upload starts while the one before works
                for before, unit in zip(units, units[1:]):
                    order = [(name, module) for name, module, _ in calls]
                    assert order.index(("ready", before)) < order.index(("upload", unit)) < order.index(("evict", before))


def test_lowvram_opens_large_blocks_and_learns_the_order_their_parts_run_in(tiny_data_dir, monkeypatch):
    monkeypatch.setattr(memory, "LOWVRAM_UNIT_BYTES", 0)  # every module without weights of its own is opened
    calls = []
    spy_on_movers(monkeypatch, calls)
    policy = DevicePolicy(CPU, torch.float32, torch.float32, "lowvram")
    streamed = ModelManager(Paths(tiny_data_dir), policy).get()
    unet = streamed.model.diffusion_model
    block = unet.middle_block[1].transformer_blocks[0]
    units = memory.stream_units(unet)
    assert block.attn1.to_q in units and block.norm1 in units and block not in units
    x, context, t = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32), torch.tensor([500.0])
    plain = ModelManager(Paths(tiny_data_dir), DevicePolicy(CPU, torch.float32, torch.float32, "none")).get()
    for forward in range(2):
        calls.clear()
        with torch.no_grad():
            assert torch.equal(streamed.apply_model(x, t, context), plain.apply_model(x, t, context))
        readied = [module for name, module, _ in calls if name == "ready"]
        assert sorted(map(id, readied)) == sorted(map(id, units))  # each unit once
    # norm1 runs before attn1, which the module holds first: the order is the forward's, not the list's,
    # and the second forward uploads each unit while the one that ran before it works.
    assert readied.index(block.norm1) < readied.index(block.attn1.to_q)
    order = [(name, module) for name, module, _ in calls]
    for before, unit in zip(readied, readied[1:]):
        assert order.index(("ready", before)) < order.index(("upload", unit)) < order.index(("ready", unit))


def test_a_full_size_sdxl_unet_streams_in_units_of_at_most_128_mib():
    """The paper estimate of lowvram's UNet stage at SDXL's size: the two largest neighbouring
    units in fp16 (the one at work and the next uploading) against 4.8 GiB for the whole UNet."""
    unet = build_model(detect.full_size_spec("SDXL"), device="meta").model.diffusion_model.half()
    sizes = [memory._bytes(unit) for unit in memory.stream_units(unet)]
    assert max(sizes) <= memory.LOWVRAM_UNIT_BYTES
    assert max(a + b for a, b in zip(sizes, sizes[1:])) < 0.2 * 2**30
    assert sum(sizes) == memory._bytes(unet) > 4.5 * 2**30


# -- --compile -----------------------------------------------------------------------------------

def test_a_compiled_unet_gives_the_same_pictures_and_compiles_once_per_size(data_dir):
    """Inductor on the CPU (a C++ compiler builds the kernels). The plain C++ kernels build in
    about half the time of the vectorised ones; the test is about the graphs, not the speed."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        plain = AppContext.create(Flags(data_dir=data_dir, device="cpu", precision="fp32"))
        compiled = AppContext.create(Flags(data_dir=data_dir, device="cpu", precision="fp32", compile="default"))
        request = GenerationRequest(prompt="a kitty", negative_prompt="blurry", steps=3, width=64, height=64, seed=1)
        with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
            first = pipeline.generate(compiled, request, save=False)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        assert np.abs(pixels(first) - pixels(pipeline.generate(plain, request, save=False))).max() <= 2
        # Later requests of that size, and a LoRA's weights put in place, run the same graph.
        save_file(kohya_tensors(compiled.models.get(), [CONV_3X3]), data_dir / "models" / "Lora" / "detail.safetensors")
        pipeline.generate(compiled, request.replace(seed=2), save=False)
        lora = request.replace(prompt="a kitty <lora:detail:1>")
        with_lora = pipeline.generate(compiled, lora, save=False)
        assert counters["stats"]["unique_graphs"] == graphs
        assert with_lora.images[0].tobytes() != first.images[0].tobytes()
        assert np.abs(pixels(with_lora) - pixels(pipeline.generate(plain, lora, save=False))).max() <= 2
        assert list(compiled.models.get().state_dict()) == list(plain.models.get().state_dict())
    finally:
        torch._dynamo.reset()


# -- on a GPU ------------------------------------------------------------------------------------

def random_fp16_model(family: str, seed: int = 0):
    """A full-size model of `family` with random N(0, 0.02) fp16 weights, made on the GPU (fast)
    and kept in CPU memory, as a loaded checkpoint is."""
    skeleton = build_model(detect.full_size_spec(family), device="meta").state_dict()
    g = torch.Generator("cuda").manual_seed(seed)
    weights = {k: (torch.randn(v.shape, generator=g, device="cuda", dtype=torch.float16) * 0.02).cpu()
               for k, v in skeleton.items() if v.is_floating_point()}
    return loader.build_from_state_dict(weights)


def peak_after(fn) -> tuple[object, int]:
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["SD1", "SDXL"])
def test_on_the_gpu_the_offload_modes_give_the_default_pictures_bit_for_bit(tmp_path, family):
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    model = tiny_sd_model(seed=0) if family == "SD1" else tiny_family_model("SDXL", seed=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "m.safetensors",
              metadata={"resolution": "64"})
    request = GenerationRequest(prompt="a red circle", negative_prompt="blurry", width=64, height=64, steps=6, seed=3)
    pictures = {}
    for mode in ("default", "medvram", "lowvram"):
        ctx = AppContext.create(Flags(data_dir=tmp_path, device="cuda", medvram=mode == "medvram", lowvram=mode == "lowvram"))
        pictures[mode] = pipeline.generate(ctx, request, save=False).images[0].tobytes()
        again = pipeline.generate(ctx, request, save=False)  # lowvram's second pass uploads the next block beside
        assert again.images[0].tobytes() == pictures[mode]
        if mode != "default":  # nothing left on the GPU, every weight back in its page-locked home
            assert all(w.device.type == "cpu" and w.is_pinned() for w in ctx.models.get().parameters())
        del ctx
        gc.collect()
    assert pictures["medvram"] == pictures["default"]
    assert pictures["lowvram"] == pictures["default"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_the_mover_copies_from_page_locked_homes_on_its_own_stream():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1)).half()
    module.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 32, 32, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        expected = copy.deepcopy(module).cuda()(x)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    memory.pin_homes(module)
    assert all(p.is_pinned() for p in module.parameters())
    assert module[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())
    homes = [p.data_ptr() for p in module.parameters()]
    mover = WeightMover(torch.device("cuda"))
    mover.upload(module)  # starts on the side stream
    assert mover._uploads[module].done is not None
    mover.ready(module)
    with torch.no_grad():
        assert torch.equal(module(x), expected)
    mover.evict(module)
    assert [p.data_ptr() for p in module.parameters()] == homes and all(p.device.type == "cpu" for p in module.parameters())
    # Changed while on the device (as the VAE put in float32 after a NaN): the new values come back.
    mover.ready(module)
    module.float()
    mover.evict(module)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 and p.is_pinned() for p in module.parameters())
    assert all(torch.equal(module.state_dict()[k], v.float()) for k, v in state.items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_lowvram_streams_a_full_size_sd15_unet_bit_for_bit_in_little_memory():
    unet = random_fp16_model("SD1").model.diffusion_model.to(memory_format=torch.channels_last)
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(2, 4, 64, 64, generator=g, device="cuda", dtype=torch.float16)
    context = torch.randn(2, 77, 768, generator=g, device="cuda", dtype=torch.float16)
    t = torch.tensor([10.0, 700.0], device="cuda")
    with torch.no_grad():
        whole = unet.to("cuda")
        expected = whole(x, t, context).clone()
        unet = whole.to("cpu")
        memory.pin_homes(unet)
        units = memory.stream_blocks(unet, torch.device("cuda"))
        first, _ = peak_after(lambda: unet(x, t, context))
        second, peak = peak_after(lambda: unet(x, t, context))  # with the next block uploading beside
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert all(p.device.type == "cpu" for p in unet.parameters())
    largest_pair = max(memory._bytes(a) + memory._bytes(b) for a, b in zip(units, units[1:]))
    assert peak < largest_pair + 0.5 * 2**30, f"peak {peak / 2**30:.2f} GiB"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_lowvram_makes_an_sdxl_picture_at_1024_px_in_at_most_3_gb(tmp_path):
    """Full-size SDXL (random weights), 1024x1024, two steps with CFG, the decode included. The
    stages, estimated: text encoders 1.5 GiB; UNet two units of <= 94 MiB plus 0.33 GiB of
    activations; VAE decode 0.16 GiB plus 1.5 GiB of activations in fp16 (3 GiB in fp32)."""
    model = random_fp16_model("SDXL")
    policy = DevicePolicy(torch.device("cuda"), torch.float16, torch.float16, "lowvram")
    memory.place(model, policy)
    manager = ModelManager(Paths(tmp_path), policy)
    request = GenerationRequest(prompt="a lighthouse at dusk", negative_prompt="blurry", width=1024, height=1024,
                                steps=2, seed=1)

    def picture():
        latents = pipeline.sample_latents(model, request, [1], device=torch.device("cuda"),
                                          using=lambda part: manager.using(model, part))
        with manager.using(model, "vae"):
            return pipeline.latents_to_images(model, latents)

    images, peak = peak_after(picture)
    assert images[0].size == (1024, 1024)
    assert model.first_stage_model.dtype == torch.float16, "the random VAE overflowed in fp16; the peak is float32's"
    assert peak <= 3e9, f"peak {peak / 2**30:.2f} GiB"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode, medvram", [("default", True), ("reduce-overhead", False)])
def test_on_the_gpu_a_compiled_unet_gives_the_same_pictures_and_compiles_once_per_size(data_dir, mode, medvram):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        plain = AppContext.create(Flags(data_dir=data_dir, device="cuda"))
        compiled = AppContext.create(Flags(data_dir=data_dir, device="cuda", compile=mode, medvram=medvram))
        request = GenerationRequest(prompt="a kitty", negative_prompt="blurry", steps=4, width=64, height=64, seed=1)
        first = pipeline.generate(compiled, request, save=False)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        assert np.abs(pixels(first) - pixels(pipeline.generate(plain, request, save=False))).max() <= 4
        second = pipeline.generate(compiled, request, save=False)  # under medvram the UNet uploaded anew
        assert counters["stats"]["unique_graphs"] == graphs
        assert second.images[0].tobytes() == first.images[0].tobytes()
        pipeline.generate(compiled, request.replace(width=96), save=False)  # another size: a graph of its own
        assert counters["stats"]["unique_graphs"] == graphs + 1
    finally:
        torch._dynamo.reset()
