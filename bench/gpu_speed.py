"""UNet steps a second, seconds a picture, peak GPU memory and first-picture latency: ours against
diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline on the same weights, in one run.

    python bench/gpu_speed.py [--device cuda] [--steps 20] [--repeats 3] [--cases sd15-512-b1,sd15-512-b4,sdxl-1024-b1]
                              [--sides ours,diffusers] [--json PATH]
    venv/bin/python bench/gpu_speed.py --device cpu --tiny      # the same measurements on tiny models, in seconds

Cases: SD 1.5 at 512 px, batch 1 and 4, and SDXL base at 1024 px, batch 1; Euler, 20 steps, CFG 7
with a negative prompt, fp16 on CUDA (fp32 on the CPU). Attention is PyTorch's SDPA on both sides
(ours always; diffusers' default processor on torch 2). `--tiny` takes the tiny models of
tests/tiny.py (the same classes and key layouts) at 64 px, 3 steps, best of 2: a check that the
whole run works, whose timings (of tiny networks, on a CPU) say nothing about the real ones.

The same weights: one checkpoint file per family with random weights (full size: the file
bench/load.py writes, fp16, shared with bench/gpu_generate.py; tiny: tests/tiny.py's model).
Ours loads it through the web UI's ModelManager. diffusers' pipeline is made from the same file's
tensors by diffusers' own single-file conversion functions: the UNet, the VAE, CLIP ViT-L (as
transformers' CLIPTextModel) and SDXL's OpenCLIP bigG (as CLIPTextModelWithProjection), so both
hold every weight with the same values (in memory of their own: on a GPU both models fit at once,
SDXL's 7 GB each in fp16). What diffusers would read from a hub config (head sizes, VAE scale) comes from
our detection of the file instead; both tokenizers are the same offline CLIP BPE (diffusers' SDXL
second tokenizer pads with "!", as bigG's does). diffusers' VAE decodes in the pipeline's dtype
(force_upcast off), as ours does first; its scheduler is EulerDiscreteScheduler on SD's training
schedule.

Measured, in one process, every side timed in turns (ours, diffusers, ours, ...) after one
warm-up call each, best of `--repeats`, torch.cuda.synchronize() around each timing:

- UNet it/s: the sampling loop alone from fixed conditioning (the same random text embeddings and
  unit noise on both sides): ours `run_sampler` (Euler) with the batched `CFGDenoiser`; diffusers'
  pipeline called with prompt_embeds / negative_prompt_embeds (and the pooled ones for SDXL),
  `latents` and output_type="latent". Both get the same noise levels (ours, passed to diffusers
  as `sigmas`), so the latents they end with are compared too ("latent difference"; in fp16 it
  includes diffusers keeping its latents in fp16 between steps, ours in fp32). it/s = steps /
  seconds, a step being one UNet call on 2 x batch rows.
- Seconds a picture end to end (text encoding, sampling, VAE decode, PIL pictures): ours
  `pipeline.generate`, diffusers a plain pipeline call with the prompts and num_inference_steps.
- Peak GPU memory of each side alone for one end-to-end call (and for the sampling loop, in the
  JSON): its weights plus the high-water mark of allocated memory above what was allocated before
  its call (the other side's model stays resident meanwhile). n/a on the CPU.
- First picture: ours from `AppContext.create` with the file in models/Stable-diffusion to the
  first picture (its one-time model hash, sha256 of the file, is computed before and reported
  apart: the hash cache keeps it at every later start); diffusers from reading the file to the
  first picture. The page cache holds the file for both, and the CUDA libraries are warmed first.
  A compiled side's first picture includes compiling.

`--sides` also takes ours-compile and ours-compile-graphs (launched with `--compile` and
`--compile reduce-overhead`, which adds CUDA graphs), and diffusers-compile and
diffusers-compile-graphs (torch.compile of diffusers' UNet in the same two modes); each ours side
is compared with the diffusers side of the same mode where there is one, else with plain
diffusers. Goal: ours at least 1.3x diffusers' it/s on the same card.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built from local files

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import write_random_checkpoint  # noqa: E402
from modules.app.config import Flags, Paths  # noqa: E402
from modules.context import AppContext  # noqa: E402
from modules.generation import pipeline  # noqa: E402
from modules.generation.request import GenerationRequest  # noqa: E402
from modules.models import loader  # noqa: E402
from modules.models.sd_model import SIZE_EMBEDDING, scaled_linear_alphas_cumprod  # noqa: E402
from modules.prompting.conditioning import Conditioning, ScheduledCond  # noqa: E402
from modules.sampling.denoiser import CFGDenoiser, model_denoiser  # noqa: E402
from modules.sampling.registry import find_sampler, run_sampler  # noqa: E402
from modules.sampling.schedules import get_sigmas  # noqa: E402
from tests.reference_models import original_config  # noqa: E402

GOAL = 1.3  # ours' it/s against diffusers'
PROMPT, NEGATIVE = "a photograph of a lighthouse at dusk", "blurry"
CFG = 7.0
SAMPLER = "Euler"
TINY_SIZE = 64


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    family: str  # modules.models.detect's family name
    size: int  # pixels, width and height
    batch: int


CASES = (
    Case("sd15-512-b1", "SD 1.5, 512 px, batch 1", "SD1", 512, 1),
    Case("sd15-512-b4", "SD 1.5, 512 px, batch 4", "SD1", 512, 4),
    Case("sdxl-1024-b1", "SDXL, 1024 px, batch 1", "SDXL", 1024, 1),
)
# bench/load.py's file names, so that its files are reused.
FILES = {"SD1": "sd15-random-fp16.safetensors", "SDXL": "sdxl-random-fp16.safetensors"}
SIDES = ("ours", "diffusers", "ours-compile", "diffusers-compile", "ours-compile-graphs", "diffusers-compile-graphs")
# A side's torch.compile mode, by the end of its name (launch.py's --compile MODE).
COMPILE_MODE = {"-compile": "default", "-compile-graphs": "reduce-overhead"}


def compile_mode(side: str) -> str | None:
    return next((mode for suffix, mode in COMPILE_MODE.items() if side.endswith(suffix)), None)


# ---- timing and memory ------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Measured:
    """Seconds of the block, and on CUDA the allocated-memory high-water mark above its start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self.extra_bytes: int | None = None

    def __enter__(self) -> "Measured":
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._started
        if self.device.type == "cuda":
            self.extra_bytes = torch.cuda.max_memory_allocated(self.device) - self._base


def tensor_bytes(modules, device: torch.device) -> int:
    """Bytes of the distinct parameters and buffers of `modules` that live on `device`."""
    seen, total = set(), 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == device.type and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def gib(n: int | None) -> float | None:
    return None if n is None else n / 2**30


def warm_up_libraries(device: torch.device, dtype: torch.dtype) -> None:
    """cuBLAS, cuDNN and the attention kernels initialise on first use: done here, so that neither
    side's first picture pays for it."""
    x = torch.randn(2, 64, 32, 32, device=device, dtype=dtype)
    torch.nn.functional.conv2d(x, torch.randn(64, 64, 3, 3, device=device, dtype=dtype), padding=1)
    torch.nn.functional.group_norm(x, 32)
    q = torch.randn(2, 8, 256, 64, device=device, dtype=dtype)
    torch.nn.functional.scaled_dot_product_attention(q, q, q)
    (q @ q.transpose(-1, -2)).sum().item()
    synchronize(device)


# ---- the fixed inputs of the sampling loop ---------------------------------------------------------


@dataclass
class LoopInputs:
    """The same for both sides: unit noise [B, 4, h, w], text embeddings [B, 77, width] for the
    prompt and the negative prompt, SDXL's pooled ones [B, n] (else None), the noise levels."""

    case: Case
    steps: int
    noise: torch.Tensor
    context: torch.Tensor
    negative_context: torch.Tensor
    pooled: torch.Tensor | None
    negative_pooled: torch.Tensor | None
    sigmas: torch.Tensor


def loop_inputs(case: Case, size: int, steps: int, spec, seed: int = 1) -> LoopInputs:
    g = torch.Generator().manual_seed(seed)
    latent = size // 8
    noise = torch.randn(case.batch, 4, latent, latent, generator=g)
    width = spec.unet["context_dim"]
    context, negative = (torch.randn(case.batch, 77, width, generator=g) for _ in range(2))
    pooled = negative_pooled = None
    if spec.vector == "sdxl":
        n = spec.unet["adm_in_channels"] - 6 * SIZE_EMBEDDING
        pooled, negative_pooled = (torch.randn(case.batch, n, generator=g) for _ in range(2))
    # The levels ours samples: they depend on the training schedule alone, which every model here shares.
    schedule = SimpleNamespace(alphas_cumprod=scaled_linear_alphas_cumprod(), apply_model=None)
    sigmas = get_sigmas("Automatic", steps, model_denoiser(schedule), find_sampler(SAMPLER))
    return LoopInputs(case, steps, noise, context, negative, pooled, negative_pooled, sigmas)


# ---- ours ---------------------------------------------------------------------------------------


class Ours:
    """The web UI as launch.py builds it, on a data folder holding the one checkpoint."""

    def __init__(self, data_dir: Path, checkpoint: str, device: torch.device, precision: str, compile: str | None = None):
        self.ctx = AppContext.create(Flags(data_dir=data_dir, ckpt=checkpoint, device=str(device),
                                           precision=precision, compile=compile))
        self.device = device
        self._model = None

    @property
    def model(self):
        """The loaded SDModel, asked for once: the manager lists the checkpoint folder at every
        `get`, which is no part of a sampling step."""
        if self._model is None:
            self._model = self.ctx.models.get()
        return self._model

    def weight_bytes(self) -> int:
        return tensor_bytes([self.model], self.device)

    def sample(self, inputs: LoopInputs) -> torch.Tensor:
        sd_model, device = self.model, self.device
        dtype = next(sd_model.model.parameters()).dtype
        size = inputs.noise.shape[-1] * 8  # pixels

        def cond(context, pooled, negative):
            vectors = None
            if pooled is not None:
                vectors = (sd_model.vector(pooled.to(device, dtype), size, size, negative=negative),)
            return ScheduledCond(((inputs.steps, context.to(device, dtype)),), vectors)

        rows = range(inputs.noise.shape[0])
        pooled = inputs.pooled if inputs.pooled is not None else [None] * len(rows)
        negative_pooled = inputs.negative_pooled if inputs.negative_pooled is not None else [None] * len(rows)
        conditioning = Conditioning(
            cond=[[(cond(inputs.context[i], pooled[i], False), 1.0)] for i in rows],
            uncond=[cond(inputs.negative_context[i], negative_pooled[i], True) for i in rows],
        )
        sampler = find_sampler(SAMPLER)
        denoiser = model_denoiser(sd_model)
        with torch.no_grad():
            sigmas = get_sigmas("Automatic", inputs.steps, denoiser, sampler).to(device)
            x = inputs.noise.to(device) * sigmas[0]
            return run_sampler(sampler, CFGDenoiser(denoiser), x, sigmas, seeds=list(rows),
                               extra_args={"conditioning": conditioning, "cond_scale": CFG})

    def pictures(self, size: int, batch: int, steps: int, seed: int = 1) -> list:
        request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, sampler_name=SAMPLER, steps=steps,
                                    cfg_scale=CFG, width=size, height=size, batch_size=batch, seed=seed)
        return pipeline.generate(self.ctx, request, save=False).images


# ---- diffusers, from the same file ----------------------------------------------------------------


def _assigned(model, state: dict):
    """`model` (built on the meta device) holding `state`'s tensors; buffers no file carries
    (CLIP's position ids) are rebuilt, as our loader does."""
    keys = set(model.state_dict())
    if not any(k.startswith("text_model.") for k in keys):  # transformers 5's CLIPTextModel has no text_model
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                if name != "position_ids":
                    raise RuntimeError(f"{type(model).__name__}: buffer {name} not filled by the conversion")
                module.register_buffer(name, torch.arange(buffer.shape[-1]).expand(buffer.shape).clone(), persistent=False)
    return model.eval().requires_grad_(False)


def _clip_config(size: dict, openclip: bool):
    from transformers import CLIPTextConfig

    if openclip:
        return CLIPTextConfig(vocab_size=size["vocab_size"], hidden_size=size["width"], intermediate_size=4 * size["width"],
                              num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                              projection_dim=size["embed_dim"], max_position_embeddings=size["context_length"],
                              hidden_act="gelu")
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings")
    return CLIPTextConfig(hidden_act="quick_gelu", **{n: size[n] for n in names})


def diffusers_pipeline(path: Path, device: torch.device, dtype: torch.dtype):
    """diffusers' SD or SDXL pipeline holding the checkpoint file's weights, converted by diffusers'
    single-file functions, in `dtype` on `device`."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from modules.prompting.tokenizer import read_vocabulary

    spec = loader.read_spec(path)
    if spec is None or spec.family not in ("SD1", "SDXL"):
        raise SystemExit(f"{path}: not an SD 1.x or SDXL checkpoint")
    tensors = load_file(str(path))
    original = original_config(spec.unet, spec.vae)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes about image_size
        unet_config = sfu.create_unet_diffusers_config_from_ldm(original, tensors, image_size=spec.resolution)
        if spec.vector == "sdxl":
            # diffusers recognises SDXL's size-and-text embedding by a context 2048 wide; tiny models are narrower.
            unet_config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=SIZE_EMBEDDING)
        vae_config = sfu.create_vae_diffusers_config_from_ldm(original, tensors, image_size=spec.resolution,
                                                              scaling_factor=spec.scale_factor)
        vae_config["force_upcast"] = False  # decode in the pipeline's dtype, as ours does first
        unet_state = sfu.convert_ldm_unet_checkpoint(tensors, unet_config)
        vae_state = sfu.convert_ldm_vae_checkpoint(tensors, vae_config)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
    parts = {"unet": _assigned(unet, unet_state), "vae": _assigned(vae, vae_state)}

    encoders = []
    for encoder in spec.text:
        openclip = encoder.kind == "openclip"
        with torch.device("meta"):
            model = (CLIPTextModelWithProjection if openclip else CLIPTextModel)(_clip_config(encoder.size, openclip))
        if openclip:
            state = sfu.convert_open_clip_checkpoint(model, tensors, prefix=encoder.prefix + ".model.")
        else:
            state = sfu.convert_ldm_clip_checkpoint(tensors, remove_prefix=encoder.prefix + ".transformer.")
        encoders.append(_assigned(model, state))
    del tensors
    for name, module in [*parts.items(), *((f"text_encoder{i}", e) for i, e in enumerate(encoders))]:
        module.to(device=device, dtype=dtype)

    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1)
    # Tokenizers of diffusers' own: a call with padding and truncation leaves them set in the fast
    # tokenizer's backend, which the web UI's shared tokenizer must not inherit.
    vocab, merges = read_vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    if spec.family == "SD1":
        pipe = StableDiffusionPipeline(text_encoder=encoders[0], tokenizer=tokenizer, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False, **parts)
    else:
        tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!")
        pipe = StableDiffusionXLPipeline(text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizer,
                                         tokenizer_2=tokenizer_2, scheduler=scheduler, add_watermarker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Diffusers:
    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype, compile: str | None = None):
        self.pipe = diffusers_pipeline(path, device, dtype)
        if compile:
            self.pipe.unet = torch.compile(self.pipe.unet, mode=None if compile == "default" else compile)
        self.device, self.dtype = device, dtype

    def weight_bytes(self) -> int:
        modules = [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]
        return tensor_bytes(modules, self.device)

    def sample(self, inputs: LoopInputs) -> torch.Tensor:
        def put(t):
            return None if t is None else t.to(self.device, self.dtype)

        extra = {}
        if inputs.pooled is not None:
            extra = {"pooled_prompt_embeds": put(inputs.pooled), "negative_pooled_prompt_embeds": put(inputs.negative_pooled)}
        size = inputs.noise.shape[-1] * 8
        with torch.no_grad():
            return self.pipe(prompt_embeds=put(inputs.context), negative_prompt_embeds=put(inputs.negative_context),
                             latents=put(inputs.noise), sigmas=inputs.sigmas.tolist(), guidance_scale=CFG,
                             height=size, width=size, output_type="latent", **extra).images

    def pictures(self, size: int, batch: int, steps: int, seed: int = 1) -> list:
        with torch.no_grad():
            return self.pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=size, width=size, num_inference_steps=steps,
                             guidance_scale=CFG, num_images_per_prompt=batch,
                             generator=torch.Generator().manual_seed(seed), output_type="pil").images


# ---- the run ----------------------------------------------------------------------------------------


def checkpoint_file(family: str, tiny: bool, folder: Path) -> Path:
    """The family's random checkpoint, written once (full size: reused from earlier runs)."""
    if tiny:
        from safetensors.torch import save_file

        from tests.tiny import tiny_family_model

        path = folder / f"tiny-{family.lower()}.safetensors"
        model = tiny_family_model(family, seed=0)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata={"resolution": str(TINY_SIZE)})
        head = model.spec.unet.get("num_head_channels", -1)
        if head != -1:  # the tiny head width, which the weights cannot show: told by a config, as a user would
            path.with_suffix(".yaml").write_text(f"model:\n  params:\n    network_config:\n      params:\n"
                                                 f"        num_head_channels: {head}\n")
        return path
    path = folder / FILES[family]
    if not path.is_file():
        print(f"writing {path} ...", flush=True)
        write_random_checkpoint(path, family)
    return path


def make_side(name: str, data_dir: Path, path: Path, device: torch.device, dtype: torch.dtype):
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    if name.startswith("ours"):
        return Ours(data_dir, path.name, device, precision, compile=compile_mode(name))
    return Diffusers(path, device, dtype, compile=compile_mode(name))


def pairs(sides: list[str]) -> list[tuple[str, str]]:
    """(ours side, the diffusers side it is compared with): the same mode where present, else
    plain diffusers, else any."""
    theirs = [name for name in sides if name.startswith("diffusers")]
    found = []
    for name in sides:
        if name.startswith("ours") and theirs:
            twin = name.replace("ours", "diffusers")
            found.append((name, twin if twin in theirs else "diffusers" if "diffusers" in theirs else theirs[0]))
    return found


def measure_case(case: Case, size: int, sides: dict, steps: int, repeats: int, spec, device: torch.device) -> dict:
    inputs = loop_inputs(case, size, steps, spec)
    latents, loop, e2e, loop_peak, e2e_peak = {}, {}, {}, {}, {}
    for name, side in sides.items():  # warm-ups, which also give the latents compared
        latents[name] = side.sample(inputs).float().cpu()
        side.pictures(size, case.batch, steps)
        loop[name], e2e[name], loop_peak[name], e2e_peak[name] = [], [], 0, 0
    for _ in range(repeats):
        for name, side in sides.items():
            with Measured(device) as m:
                side.sample(inputs)
            loop[name].append(m.seconds)
            loop_peak[name] = max(loop_peak[name], m.extra_bytes or 0)
        for name, side in sides.items():
            with Measured(device) as m:
                side.pictures(size, case.batch, steps)
            e2e[name].append(m.seconds)
            e2e_peak[name] = max(e2e_peak[name], m.extra_bytes or 0)
    out = {"title": case.title, "size": size, "batch": case.batch, "steps": steps}
    for name, side in sides.items():
        weights = side.weight_bytes() if device.type == "cuda" else None
        out[name] = {
            "it_s": steps / min(loop[name]),
            "sampling_s": loop[name],
            "s_per_picture": min(e2e[name]) / case.batch,
            "end_to_end_s": e2e[name],
            "peak_gib": None if weights is None else gib(weights + e2e_peak[name]),
            "sampling_peak_gib": None if weights is None else gib(weights + loop_peak[name]),
            "weights_gib": gib(weights),
        }
    for ours, theirs in pairs(list(sides)):
        a, b = latents[ours], latents[theirs]
        out[f"{ours} / {theirs}"] = {
            "it_s": out[ours]["it_s"] / out[theirs]["it_s"],
            "speed_per_picture": out[theirs]["s_per_picture"] / out[ours]["s_per_picture"],
            "peak_memory": None if out[ours]["peak_gib"] is None else out[ours]["peak_gib"] / out[theirs]["peak_gib"],
            "latent_max_difference": (a - b).abs().max().item(),
            "latent_std": b.std().item(),
            "goal_met": out[ours]["it_s"] / out[theirs]["it_s"] >= GOAL,
        }
    return out


def write_json(report: dict, path: Path | None) -> None:
    if path is None:
        return
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=1))
    partial.replace(path)


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def print_table(report: dict) -> None:
    tiny = " (tiny models)" if report["tiny"] else ""
    print(f"\n{report['device_name']}, {report['dtype']}, torch {report['torch']}, diffusers {report['diffusers']}, "
          f"{SAMPLER}, {report['steps']} steps, CFG {CFG}, best of {report['repeats']}{tiny}")
    print(f"{'case':<14} {'px':>4} {'side':<35} {'UNet it/s':>9} {'s/picture':>9} {'peak GiB':>8} {'first picture':>13}")
    for key, case in report["cases"].items():
        if "error" in case:
            print(f"{key:<14} failed: {case['error']}")
            continue
        first = report["first_picture"].get(case["family"], {})
        for name in report["sides"]:
            if name in case:
                f, start = case[name], first.get(name, {})
                start = _fmt(start.get("seconds"), "12.2f", "s") if start.get("case") == key else ""
                print(f"{key:<14} {case['size']:>4} {name:<35} {f['it_s']:>9.2f} {f['s_per_picture']:>9.3f} "
                      f"{_fmt(f['peak_gib'], '8.2f'):>8} {start:>13}")
        for pair, r in ((k, v) for k, v in case.items() if " / " in k):
            first_ratio = ""
            if first.get(pair.split(" / ")[0], {}).get("case") == key:
                ours, theirs = (first[name]["seconds"] for name in pair.split(" / "))
                first_ratio = f"{theirs / ours:.2f}x"
            print(f"{key:<14} {case['size']:>4} {pair:<35} {r['it_s']:>8.2f}x {r['speed_per_picture']:>8.2f}x "
                  f"{_fmt(r['peak_memory'], '7.2f', 'x'):>8} {first_ratio:>13}")
            print(f"{'':<14} {'':>4} {'':<35} goal {GOAL}x it/s {'met' if r['goal_met'] else 'missed'}; latents differ "
                  f"by {r['latent_max_difference']:.1e} at most (std {r['latent_std']:.2f})")
    print("ratios: it/s ours / diffusers; s/picture and first picture diffusers / ours (above 1: ours faster); "
          "peak memory ours / diffusers")
    for family, seconds in report["model_hash_s"].items():
        print(f"{family}: ours' one-time model hash (sha256 of the file, cached afterwards) {seconds:.2f} s, "
              "not in its first picture")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models of the same classes at 64 px (a quick check on a CPU)")
    p.add_argument("--steps", type=int, help="default 20 (--tiny: 3)")
    p.add_argument("--repeats", type=int, help="timed runs of each side, default 3 (--tiny: 2)")
    p.add_argument("--cases", default=",".join(c.key for c in CASES), help="comma-separated, of: " +
                   ", ".join(c.key for c in CASES))
    p.add_argument("--sides", default="ours,diffusers", help=f"comma-separated, of: {', '.join(SIDES)}")
    p.add_argument("--files", type=Path, default=Path(tempfile.gettempdir()),
                   help="where the full-size random checkpoints are written once and reused")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--json", type=Path, help="write every figure here (rewritten after each case)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.tiny else 20)
    repeats = args.repeats or (2 if args.tiny else 3)
    wanted = [k.strip() for k in args.cases.split(",") if k.strip()]
    cases = [c for c in CASES if c.key in wanted]
    unknown = set(wanted) - {c.key for c in CASES}
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown |= set(sides) - set(SIDES)
    if unknown or not cases or not sides:
        raise SystemExit(f"unknown or missing cases or sides: {', '.join(sorted(unknown)) or 'none given'}")
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    import diffusers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the disabled safety checker, CPU generators
    report = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "tiny": args.tiny, "steps": steps, "repeats": repeats, "sampler": SAMPLER,
        "cfg": CFG, "threads": torch.get_num_threads(), "sides": sides, "goal_it_s": GOAL,
        "model_hash_s": {}, "first_picture": {}, "cases": {},
    }
    warm_up_libraries(device, dtype)
    with tempfile.TemporaryDirectory() as root:
        for family in dict.fromkeys(c.family for c in cases):
            family_cases = [c for c in cases if c.family == family]
            size = {c.key: TINY_SIZE if args.tiny else c.size for c in family_cases}
            try:
                path = checkpoint_file(family, args.tiny, Path(root) if args.tiny else args.files)
                data_dir = Path(root) / family
                folder = data_dir / "models" / "Stable-diffusion"
                folder.mkdir(parents=True)
                for beside in (path, path.with_suffix(".yaml")):  # the checkpoint and its config, if any
                    if beside.is_file():
                        (folder / beside.name).symlink_to(beside.resolve())
                started = time.perf_counter()
                loader.model_hash(path, Paths(data_dir).hash_cache)
                report["model_hash_s"][family] = time.perf_counter() - started
                spec = loader.read_spec(path)
                made, first = {}, {}
                first_case = family_cases[0]
                for name in sides:
                    gc.collect()
                    with Measured(device) as m:
                        made[name] = make_side(name, data_dir, path, device, dtype)
                        made[name].pictures(size[first_case.key], first_case.batch, steps)
                    first[name] = {"seconds": m.seconds, "peak_gib": gib(m.extra_bytes),
                                   "case": first_case.key}
                    print(f"{family} {name}: first picture {m.seconds:.2f} s", flush=True)
                report["first_picture"][family] = first
            except Exception as e:  # the other family may still run; the JSON says what failed
                traceback.print_exc()
                for c in family_cases:
                    report["cases"][c.key] = {"family": family, "error": f"{type(e).__name__}: {e}"}
                write_json(report, args.json)
                continue
            for case in family_cases:
                try:
                    figures = measure_case(case, size[case.key], made, steps, repeats, spec, device)
                    report["cases"][case.key] = {"family": family, **figures}
                    for pair, r in ((k, v) for k, v in figures.items() if " / " in k):
                        print(f"{case.key} {pair}: it/s {r['it_s']:.2f}x, per picture {r['speed_per_picture']:.2f}x",
                              flush=True)
                except Exception as e:  # as above, for one case
                    traceback.print_exc()
                    report["cases"][case.key] = {"family": family, "error": f"{type(e).__name__}: {e}"}
                write_json(report, args.json)
            del made
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    write_json(report, args.json)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
