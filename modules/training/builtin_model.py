"""Trains the built-in model from scratch on the procedural shapes dataset.

    python -m modules.training.builtin_model --out models/Stable-diffusion/builtin-shapes.safetensors

Three stages, each resumable (`--resume` continues from the last saved state in --work-dir;
`--init-from FILE` starts at stage 2 with the weights of an earlier output of the same recipe):
1. the KL autoencoder, on reconstruction (L1 + L2) and a small KL term;
2. encoding every training picture once (the UNet stage then reads cached latent posteriors);
3. the UNet and the CLIP text encoder together, end to end through the diffusion loss (SD's
   scaled-linear noise schedule, eps or v prediction), with 10% empty captions for classifier-free
   guidance, optionally a share of captions that name one attribute only, and an exponential
   moving average (EMA) of their weights.

The output is ONE .safetensors file in the SD 1.x key layout (what SDModel.state_dict() gives),
so the ordinary loader reads it; its metadata holds the resolution, the latent scale factor, the
recipe and, for a run that went on from another file, the recipes of the runs before it. Every
random choice comes from --seed, per step, so a resumed run continues exactly as an
uninterrupted one would.

The shipped model is five runs, each starting from the previous one's output (--out; runs 2-5
also take `--init-from PREVIOUS --images 10000 --batch 32 --prediction v`):
1. the defaults (eps prediction; from scratch);
2. `--lr 5e-4 --warmup 100 --unet-steps 2500 --pure-noise-fraction 0.25 --snr-floor 1`;
3. `--lr 5e-4 --warmup 50 --unet-steps 1500 --pure-noise-fraction 0.75 --snr-floor 1`;
4. `--lr 3e-4 --warmup 50 --lr-end 0.1 --unet-steps 2500 --pure-noise-fraction 0.3 --snr-floor 0.3`;
5. `--lr 1e-4 --warmup 50 --lr-end 0.1 --unet-steps 2000 --pure-noise-fraction 0.15 --snr-floor 0.3
   --export-every 500`, its output as exported after 500 steps.
Run 2 was recorded as a 4000-step run stopped at step 2500; with a constant learning rate
(--lr-end 1) that is the same as a 2500-step run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

from modules.app.fileio import atomic_write
from modules.models.detect import ModelSpec, TextEncoderSpec
from modules.models.sd_model import DIFFUSION_TARGETS, SDModel, diffusion_target, noised
from modules.prompting.conditioning import CONTEXT_TOKENS
from modules.prompting.tokenizer import BOS_ID, EOS_ID, tokenize
from modules.training import shapes_dataset

STATE_FILE = "state.pt"
LATENTS_FILE = "latents.pt"


@dataclass
class Recipe:
    """Everything that decides the trained weights. Defaults: the first of the shipped model's runs."""

    seed: int = 0
    resolution: int = 64
    images: int = 40000  # distinct training pictures (captions are re-drawn every step)
    two_shape_fraction: float = 0.1
    empty_caption_fraction: float = 0.1
    caption_drop: float = 0.1  # chance to leave size / position / background out of a caption
    focus_caption_fraction: float = 0.0  # share of captions naming one attribute only (see focused_caption)
    focus_attributes: tuple[str, ...] = shapes_dataset.FOCUS_ATTRIBUTES  # drawn from uniformly; repeat one to weight it
    # Autoencoder: downsampling factor 2 ** (len(vae_ch_mult) - 1).
    vae_ch: int = 32
    vae_ch_mult: tuple[int, ...] = (1, 2, 2)
    vae_res_blocks: int = 2
    vae_steps: int = 6000
    vae_batch: int = 32
    vae_crop: int = 32  # train on random crops of this side for the first 3/4 of the steps (0: never)
    vae_lr: float = 5e-4
    vae_lr_end: float = 0.05  # learning rate at the last step, as a fraction of vae_lr (cosine decay; 1: constant)
    vae_kl_weight: float = 1e-5
    # Text encoder (CLIP layout; attention heads = hidden // 64 as detection infers them).
    text_hidden: int = 128
    text_layers: int = 2
    # UNet.
    unet_ch: int = 64
    unet_ch_mult: tuple[int, ...] = (1, 2, 2)
    unet_res_blocks: int = 1
    unet_attention: tuple[int, ...] = (2, 4)
    unet_steps: int = 2000
    batch: int = 128
    lr: float = 1e-3
    lr_end: float = 1.0  # as vae_lr_end, for the UNet and text encoder
    warmup: int = 500
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    # The x0 error counts clamp(snr, snr_floor, min_snr_gamma) times (see loss_weight). Min-SNR
    # alone (floor 0) counts the noisiest steps, where the layout is decided, snr (about 0.005)
    # times; a floor of 1 counts them as much as the middle of the schedule.
    snr_floor: float = 0.0
    prediction: str = "eps"  # what the UNet predicts: "eps" (the noise) or "v"
    # Share of each batch trained as sampling's first step runs: at the last timestep on pure noise.
    # The schedule leaves sqrt(alpha_bar) = 0.07 of the picture there, enough to find a large shape,
    # so without these rows the UNet learns to take the layout from the noise, not from the words.
    pure_noise_fraction: float = 0.0

    def __post_init__(self):
        unknown = set(self.focus_attributes) - set(shapes_dataset.FOCUS_ATTRIBUTES)
        if unknown or not self.focus_attributes:
            raise ValueError(f"focus_attributes must name some of {', '.join(shapes_dataset.FOCUS_ATTRIBUTES)}; "
                             f"got {', '.join(self.focus_attributes) or 'none'}")
        if self.prediction not in DIFFUSION_TARGETS:
            raise ValueError(f"prediction must be one of {', '.join(DIFFUSION_TARGETS)}; got {self.prediction!r}")
        if not 0.0 <= self.snr_floor <= self.min_snr_gamma:
            raise ValueError(f"snr_floor must be from 0 to min_snr_gamma ({self.min_snr_gamma}); got {self.snr_floor}")
        for name in ("vae_lr_end", "lr_end", "pure_noise_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a fraction, from 0 to 1; got {getattr(self, name)}")

    def spec(self, scale_factor: float = 1.0) -> ModelSpec:
        return ModelSpec(
            family="SD1",
            unet=dict(in_channels=4, out_channels=4, model_channels=self.unet_ch,
                      attention_resolutions=tuple(self.unet_attention), num_res_blocks=self.unet_res_blocks,
                      channel_mult=tuple(self.unet_ch_mult), num_heads=8, context_dim=self.text_hidden,
                      transformer_depth=1, use_linear_in_transformer=False),
            vae=dict(ch=self.vae_ch, ch_mult=tuple(self.vae_ch_mult), num_res_blocks=self.vae_res_blocks,
                     in_channels=3, out_ch=3, z_channels=4, embed_dim=4),
            text=(TextEncoderSpec("cond_stage_model", "clip", dict(
                vocab_size=49408, hidden_size=self.text_hidden, intermediate_size=4 * self.text_hidden,
                num_hidden_layers=self.text_layers, num_attention_heads=max(1, self.text_hidden // 64),
                max_position_embeddings=CONTEXT_TOKENS)),),
            prediction=self.prediction, scale_factor=scale_factor, resolution=self.resolution,
        )


# Fields that only say how long to train: they may change when resuming.
_LENGTH_FIELDS = {"vae_steps", "unet_steps"}
# Fields the autoencoder and the cached latents depend on. Until the UNet stage has taken a step,
# a resumed run may change every other field: it keeps the trained autoencoder and starts the
# UNet and text encoder of the new recipe.
_AUTOENCODER_FIELDS = {"seed", "resolution", "images", "two_shape_fraction", "vae_ch", "vae_ch_mult",
                       "vae_res_blocks", "vae_crop", "vae_lr", "vae_lr_end", "vae_kl_weight", "vae_batch"}


# How many times each prediction's squared error holds the x0 error at a given SNR.
_X0_ERROR_IN_LOSS = {"eps": lambda snr: snr, "v": lambda snr: snr + 1}


def _pure_noise_rows(z0, t, noise, alphas, fraction: float, g: torch.Generator):
    """Moves a share of the rows to the last timestep with the noise that cancels their picture,
    so their input is (1 - alpha_bar).sqrt() * unit noise, as k-diffusion's first step feeds the
    UNet, and their targets still lead to the picture."""
    rows = (torch.rand(len(t), generator=g) < fraction).to(t.device)
    last = torch.full_like(t, len(alphas) - 1)
    a = alphas[-1]
    return torch.where(rows, last, t), torch.where(rows.view(-1, 1, 1, 1), noise - (a / (1 - a)).sqrt() * z0, noise)


def loss_weight(alpha_bar: torch.Tensor, r: Recipe) -> torch.Tensor:
    """Per-sample weight of the squared prediction error, so that the x0 error counts
    clamp(snr, r.snr_floor, r.min_snr_gamma) times whatever the UNet predicts (Min-SNR weighting,
    with a floor)."""
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(min=r.snr_floor, max=r.min_snr_gamma) / _X0_ERROR_IN_LOSS[r.prediction](snr)


def caption_tokens(captions: list[str]) -> torch.Tensor:
    """[B, 77] token ids as modules/conditioning.py builds a one-chunk prompt: BOS, the prompt's
    tokens, then the end token repeated to the end (SD 1.x pads with it)."""
    return torch.tensor([_caption_row(c) for c in captions], dtype=torch.long)


@functools.lru_cache(maxsize=200_000)
def _caption_row(caption: str) -> tuple[int, ...]:
    # Captions repeat across steps; tokenizing each once keeps the CPU from starving a GPU.
    ids = tokenize([caption])[0][: CONTEXT_TOKENS - 2]
    return (BOS_ID, *ids, *[EOS_ID] * (CONTEXT_TOKENS - 1 - len(ids)))


def training_caption(scene: shapes_dataset.Scene, rng: random.Random, r: Recipe) -> str:
    if rng.random() < r.empty_caption_fraction:
        return ""
    # Drawn only when focused captions are on, so recipes without them keep their random stream.
    if r.focus_caption_fraction and rng.random() < r.focus_caption_fraction:
        return shapes_dataset.focused_caption(scene, rng.choice(r.focus_attributes), rng)
    return shapes_dataset.caption(scene, rng, drop=r.caption_drop)


def _zero_output_layers(unet: torch.nn.Module) -> None:
    """Zero each residual branch's last layer and the UNet's output: every block starts as the
    identity, which trains faster and more stably than default initialisation."""
    for name, module in unet.named_modules():
        if name == "out.2" or name.endswith("out_layers.3") or name.endswith("proj_out"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + stage * 10_000_019 + step) % 2**63)


def _lr_at(step: int, peak: float, warmup: int, total: int = 0, end: float = 1.0) -> float:
    """Linear warmup to `peak`, then (when end < 1) a cosine decay to end * peak at step `total`."""
    if step < warmup or end >= 1.0:
        return peak * min(1.0, (step + 1) / max(1, warmup))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _images_to_tensor(images: np.ndarray, device) -> torch.Tensor:
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


class Trainer:
    def __init__(self, recipe: Recipe, work_dir: Path, device: torch.device, resume: bool,
                 init_from: Path | None = None, log=print):
        self.recipe, self.work_dir, self.device, self.log = recipe, work_dir, device, log
        work_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(recipe.seed)
        self.model = SDModel(recipe.spec()).to(device)
        _zero_output_layers(self.model.model.diffusion_model)
        self.state = {"stage": "vae", "step": 0, "seconds": {"vae": 0.0, "encode": 0.0, "unet": 0.0},
                      "scale_factor": None, "ema": None, "optimizer": None}
        state_path = work_dir / STATE_FILE
        if resume and state_path.exists():
            self._load_state(state_path)
        elif init_from is not None:
            self._init_from(init_from)
        self.images, self.scenes = shapes_dataset.training_examples(
            recipe.images, recipe.seed, size=recipe.resolution, two_shape_fraction=recipe.two_shape_fraction)

    # ---- checkpoints ----

    def _load_state(self, path: Path) -> None:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        mine = dataclasses.asdict(self.recipe)
        # A field added since the state was saved had its default then: that is what it trained with.
        theirs = {**dataclasses.asdict(Recipe()), **saved["recipe"]}
        state = saved["state"]
        unet_started = state["stage"] in ("unet", "done") and state["step"] > 0
        must_match = set(mine) if unet_started else _AUTOENCODER_FIELDS
        differ = [k for k in mine if k in must_match - _LENGTH_FIELDS and _plain(mine[k]) != _plain(theirs[k])]
        if differ:
            raise SystemExit(f"cannot resume from {path}: the recipe differs in {', '.join(differ)} "
                             f"(saved: {', '.join(f'{k}={theirs[k]!r}' for k in differ)})")
        if unet_started or all(_plain(mine[k]) == _plain(theirs[k]) for k in mine if k not in _LENGTH_FIELDS):
            self.model.load_state_dict(saved["model"])
        else:
            prefix = "first_stage_model."
            self.model.first_stage_model.load_state_dict(
                {k[len(prefix):]: v for k, v in saved["model"].items() if k.startswith(prefix)})
            self.log("keeping the trained autoencoder; UNet and text encoder start from the new recipe")
        self.state = state
        self.log(f"resumed from {path}: stage {self.state['stage']}, step {self.state['step']}")

    def _init_from(self, path: Path) -> None:
        """Start from a trained checkpoint of the same recipe's shapes: its autoencoder is kept
        (the latents are encoded again) and the UNet and text encoder train on from its weights."""
        with safe_open(str(path), "pt") as f:
            weights = {k: f.get_tensor(k).float() for k in f.keys()}
            metadata = f.metadata() or {}
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as error:
            raise SystemExit(f"cannot start from {path}: its networks differ from the recipe's ({error})")
        try:
            stages = earlier_stages(metadata)
        except (ValueError, AttributeError) as error:
            raise SystemExit(f"cannot start from {path}: its metadata's training records are unreadable ({error})")
        self.state.update(stage="encode", step=0, initialised_from=path.name, earlier_stages=stages)
        self.log(f"starting from the weights of {path}")

    def save(self) -> None:
        _atomic_save({"recipe": dataclasses.asdict(self.recipe), "model": self.model.state_dict(),
                      "state": self.state}, self.work_dir / STATE_FILE)

    # ---- stage 1: autoencoder ----

    def train_vae(self, save_every: int) -> None:
        r, vae = self.recipe, self.model.first_stage_model
        vae.train().requires_grad_(True)
        opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
        if self.state["optimizer"] is not None and self.state["stage"] == "vae":
            opt.load_state_dict(self.state["optimizer"])
        bar = tqdm(range(self.state["step"], r.vae_steps), desc="autoencoder", mininterval=5, file=sys.stdout,
                   initial=self.state["step"], total=r.vae_steps)
        started = time.monotonic()
        for step in bar:
            g = _step_generator(r.seed, 1, step)
            idx = torch.randint(len(self.images), (r.vae_batch,), generator=g)
            x = _images_to_tensor(self.images[idx.numpy()], self.device)
            if r.vae_crop and step < r.vae_steps * 3 // 4:
                top, left = torch.randint(r.resolution - r.vae_crop + 1, (2,), generator=g).tolist()
                x = x[:, :, top:top + r.vae_crop, left:left + r.vae_crop]
            mean, logvar = vae.encode(x)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g).to(self.device)
            out = vae.decode(z)
            rec = F.l1_loss(out, x) + F.mse_loss(out, x)
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
            loss = rec + r.vae_kl_weight * kl
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, r.vae_lr, 100, r.vae_steps, r.vae_lr_end)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}", refresh=False)
            self.state["step"] = step + 1
            if (step + 1) % save_every == 0 or step + 1 == r.vae_steps:
                self.state["seconds"]["vae"] += time.monotonic() - started
                started = time.monotonic()
                self.state["optimizer"] = opt.state_dict()
                self.save()
        self.state["seconds"]["vae"] += time.monotonic() - started
        vae.eval().requires_grad_(False)
        self.log(f"autoencoder check on held-out pictures: {self.vae_check()}")
        self.state.update(stage="encode", step=0, optimizer=None)
        self.save()

    @torch.no_grad()
    def vae_check(self, n: int = 200) -> str:
        """How often the attributes survive a trip through the autoencoder (read back from pixels)."""
        scenes = shapes_dataset.held_out_scenes(n, self.recipe.seed + 1)
        images = np.stack([shapes_dataset.render(s, self.recipe.resolution) for s in scenes])
        vae = self.model.first_stage_model
        hits: dict[str, int] = {}
        for i in range(0, n, 50):
            x = _images_to_tensor(images[i:i + 50], self.device)
            out = vae.decode(vae.encode(x)[0])
            pixels = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            for scene, picture in zip(scenes[i:i + 50], pixels):
                got, want = shapes_dataset.read_scene(picture), shapes_dataset.scene_attributes(scene)
                for k in want:
                    hits[k] = hits.get(k, 0) + (got[k] == want[k])
        return ", ".join(f"{k} {100 * v / n:.0f}%" for k, v in hits.items())

    # ---- stage 2: latents ----

    @torch.no_grad()
    def encode_latents(self) -> None:
        started = time.monotonic()
        vae = self.model.first_stage_model.eval()
        means, stds = [], []
        for i in tqdm(range(0, len(self.images), 100), desc="encoding", mininterval=5, file=sys.stdout):
            mean, logvar = vae.encode(_images_to_tensor(self.images[i:i + 100], self.device))
            means.append(mean.cpu())
            stds.append(torch.exp(0.5 * logvar).cpu())
        mean, std = torch.cat(means), torch.cat(stds)
        _atomic_save({"mean": mean, "std": std}, self.work_dir / LATENTS_FILE)
        self.state["scale_factor"] = float(1.0 / mean.std())
        self.state["seconds"]["encode"] += time.monotonic() - started
        self.state.update(stage="unet", step=0, optimizer=None)
        self.log(f"latents {tuple(mean.shape)}, scale factor {self.state['scale_factor']:.4f}, "
                 f"mean posterior std {std.mean():.4f}")
        self.save()

    # ---- stage 3: UNet and text encoder ----

    def _trained_modules(self):
        return [self.model.model.diffusion_model, self.model.cond_stage_model]

    def _trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {k: p for k, p in self.model.named_parameters()
                if k.startswith(("model.diffusion_model.", "cond_stage_model."))}

    def train_unet(self, save_every: int, export_every: int, out: Path | None) -> None:
        r = self.recipe
        latents = torch.load(self.work_dir / LATENTS_FILE, map_location="cpu")
        scale = self.state["scale_factor"]
        params = self._trained_parameters()
        for module in self._trained_modules():
            module.train().requires_grad_(True)
        decay, no_decay = [], []
        for name, p in params.items():
            (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=r.lr, betas=(0.9, 0.99))
        if self.state["optimizer"] is not None:
            opt.load_state_dict(self.state["optimizer"])
        if self.state["ema"] is None:
            self.state["ema"] = {k: p.detach().clone().cpu() for k, p in params.items()}
        ema = {k: t.to(self.device) for k, t in self.state["ema"].items()}
        ema_keys = list(params)
        alphas = self.model.alphas_cumprod.to(self.device)

        bar = tqdm(range(self.state["step"], r.unet_steps), desc="unet+text", mininterval=5, file=sys.stdout,
                   initial=self.state["step"], total=r.unet_steps)
        started = time.monotonic()
        running = None
        for step in bar:
            g = _step_generator(r.seed, 3, step)
            rng = random.Random(f"{r.seed}-{step}")
            idx = torch.randint(len(self.scenes), (r.batch,), generator=g)
            captions = [training_caption(self.scenes[i], rng, r) for i in idx.tolist()]
            z0 = latents["mean"][idx] + latents["std"][idx] * torch.randn(latents["mean"][idx].shape, generator=g)
            z0 = (z0 * scale).to(self.device)
            t = torch.randint(len(alphas), (r.batch,), generator=g).to(self.device)
            noise = torch.randn(z0.shape, generator=g).to(self.device)
            if r.pure_noise_fraction:
                t, noise = _pure_noise_rows(z0, t, noise, alphas, r.pure_noise_fraction, g)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = noised(z0, noise, a)
            context = self.model.cond_stage_model(caption_tokens(captions).to(self.device))
            predicted = self.model.model.diffusion_model(xt, t, context)
            target = diffusion_target(r.prediction, z0, noise, a)
            weight = loss_weight(a.flatten(), r)
            loss = (weight * (predicted - target).pow(2).mean(dim=(1, 2, 3))).mean()
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, r.lr, r.warmup, r.unet_steps, r.lr_end)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
            with torch.no_grad():
                d = min(r.ema_decay, (1 + step) / (10 + step))
                torch._foreach_lerp_([ema[k] for k in ema_keys], [params[k].detach() for k in ema_keys], 1 - d)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            self.state["step"] = step + 1
            done = step + 1 == r.unet_steps
            if (step + 1) % save_every == 0 or done or (out and (step + 1) % export_every == 0):
                self.state["seconds"]["unet"] += time.monotonic() - started
                started = time.monotonic()
                self.state["optimizer"] = opt.state_dict()
                self.state["ema"] = {k: v.cpu() for k, v in ema.items()}
                if done:
                    self.state["stage"] = "done"
                self.save()
                if out and ((step + 1) % export_every == 0 or done):
                    self.export(out)
                    self.log(f"step {step + 1}: wrote {out} (loss {running:.4f})")
        for module in self._trained_modules():
            module.eval().requires_grad_(False)

    # ---- output ----

    def export(self, out: Path) -> None:
        """The SD 1.x checkpoint: EMA weights for the UNet and text encoder, fp16, with metadata."""
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        for k, v in (self.state["ema"] or {}).items():
            weights[k] = v
        weights = {k: v.to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
                   for k, v in weights.items()}
        recipe = dataclasses.asdict(self.recipe)
        trained = {"unet_steps_done": self.state["step"] if self.state["stage"] in ("unet", "done") else 0,
                   "seconds": {k: round(v) for k, v in self.state["seconds"].items()}}
        if "initialised_from" in self.state:
            trained["initialised_from"] = self.state["initialised_from"]
        metadata = {
            "resolution": str(self.recipe.resolution),
            "scale_factor": f"{self.state['scale_factor']:.6f}",
            "prediction": self.recipe.prediction,
            "recipe": json.dumps(recipe, sort_keys=True),
            "training": json.dumps(trained, sort_keys=True),
            "description": "Built-in model trained by modules/training/builtin_model.py on procedurally "
                           "drawn coloured shapes (modules/training/shapes_dataset.py).",
        }
        if self.state.get("earlier_stages"):
            metadata["earlier_stages"] = json.dumps(self.state["earlier_stages"], sort_keys=True)
        atomic_write(out, lambda f: f.write(safetensors.torch.save(weights, metadata=metadata)))


def earlier_stages(metadata: dict[str, str]) -> list[dict]:
    """Every stage that made a checkpoint, oldest first, from its metadata: the stages before it
    and its own (recipe and training record), so that a file trained on from it can be made again
    from scratch by running them in order with --init-from."""
    stages = json.loads(metadata.get("earlier_stages", "[]"))
    if "recipe" in metadata:
        stages.append({"recipe": json.loads(metadata["recipe"]), "training": json.loads(metadata.get("training", "{}"))})
    return stages


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m modules.training.builtin_model", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/Stable-diffusion/builtin-shapes.safetensors"))
    p.add_argument("--work-dir", type=Path, default=Path("cache/builtin-model-training"),
                   help="where the resumable training state and cached latents live")
    p.add_argument("--resume", action="store_true", help="continue from the state in --work-dir")
    p.add_argument("--init-from", type=Path, default=None,
                   help="a built-in model checkpoint to train on from (its autoencoder is kept)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--save-every", type=int, default=200, help="steps between saved training states")
    p.add_argument("--export-every", type=int, default=1000,
                   help="UNet steps between writes of --out (it is always written at the end)")
    for f in dataclasses.fields(Recipe):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, tuple):
            item = type(f.default[0])
            p.add_argument(flag, type=lambda s, item=item: tuple(item(v.strip()) for v in s.split(",")),
                           default=f.default, help=f"comma-separated ({item.__name__})")
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    return p


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    try:
        return Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    except ValueError as error:
        raise SystemExit(f"bad recipe: {error}")


def main(argv: list[str] | None = None) -> Path:
    args = _parser().parse_args(argv)
    recipe = recipe_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    trainer = Trainer(recipe, args.work_dir, device, args.resume, args.init_from)
    print(f"device {device}; parameters: " + ", ".join(
        f"{name} {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M" for name, m in (
            ("unet", trainer.model.model.diffusion_model), ("vae", trainer.model.first_stage_model),
            ("text", trainer.model.cond_stage_model))), flush=True)
    if trainer.state["stage"] == "vae":
        trainer.train_vae(args.save_every)
    if trainer.state["stage"] == "encode":
        trainer.encode_latents()
    if trainer.state["stage"] == "unet" or (trainer.state["stage"] == "done" and trainer.state["step"] < recipe.unet_steps):
        trainer.state["stage"] = "unet"
        trainer.train_unet(args.save_every, args.export_every, args.out)
    trainer.export(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB); "
          f"seconds: {trainer.state['seconds']}", flush=True)
    return args.out


if __name__ == "__main__":
    main()
