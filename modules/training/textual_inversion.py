"""Textual-inversion embeddings: create one, train its vectors on a folder of pictures.

Only the embedding's vectors learn; the model is frozen and untouched. Training goes through the
diffusion loss of the loaded checkpoint: a picture's latent is noised at a random timestep and
the UNet, conditioned on a template prompt in which the embedding's vectors take the place of
its name, must predict the noise (or v, for v-prediction models).

Files are A1111's: `embeddings/<name>.pt` ({"string_to_param": {"*": [n, dim]}, "step", ...}) or
`.safetensors` ({"emb_params": [n, dim]}), always written whole under a temporary name and then
renamed, so an interrupted or crashed run leaves the previous file intact. The step is stored in
the file, and training an embedding that has steps continues from there.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

from modules.app import fields
from modules.app.fields import bounded, one_of
from modules.app.fileio import atomic_write
from modules.generation import pipeline
from modules.generation.request import GenerationRequest
from modules.images import storage
from modules.models.sd_model import diffusion_target, noised
from modules.networks import embeddings
from modules.prompting.conditioning import CHUNK_TOKENS, PAD_ID, PLACEHOLDER_ID
from modules.prompting.tokenizer import BOS_ID, EOS_ID, tokenize
from modules.service.jobs import Job
from modules.training import ti_dataset
from modules.training.lr_schedule import parse_schedule

EMBEDDING_SUFFIXES = (".pt", ".safetensors")
MAX_STEPS = 10**7
MAX_VECTORS = CHUNK_TOKENS
# Names become file names and prompt words: letters, digits, '-', '_' and '.' only.
_NAME = re.compile(r"^[\w.-]+$")


class TrainingError(ValueError):
    """Options or files a person has to fix."""


# ---- files --------------------------------------------------------------------------------------


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not name or not _NAME.match(name) or name.startswith("."):
        raise TrainingError(f"embedding name {name!r}: use letters, digits, '-', '_' or '.', and no spaces")
    return name


def embedding_bytes(vectors: torch.Tensor, *, name: str, step: int, suffix: str,
                    checkpoint_hash: str | None = None, checkpoint_name: str | None = None) -> bytes:
    vectors = vectors.detach().to("cpu", torch.float32).contiguous()
    if suffix == ".safetensors":
        metadata = {"name": name, "step": str(step)}
        metadata |= {k: v for k, v in (("sd_checkpoint", checkpoint_hash), ("sd_checkpoint_name", checkpoint_name)) if v}
        return safetensors.torch.save({"emb_params": vectors}, metadata=metadata)
    buffer = io.BytesIO()
    torch.save({
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vectors},
        "name": name,
        "step": step,
        "sd_checkpoint": checkpoint_hash,
        "sd_checkpoint_name": checkpoint_name,
    }, buffer)
    return buffer.getvalue()


def save_embedding(path: Path, vectors: torch.Tensor, *, step: int, **info) -> Path:
    data = embedding_bytes(vectors, name=path.stem, step=step, suffix=path.suffix, **info)
    atomic_write(path, lambda f: f.write(data))
    return path


def read_embedding(path: Path) -> tuple[torch.Tensor, int]:
    """(vectors [n, dim], step) of an embedding file."""
    try:
        embedding = embeddings.read_embedding(path)
    except embeddings.EmbeddingError as e:
        raise TrainingError(f"cannot read the embedding {Path(path).name}: {e}") from e
    return embedding.vectors, embedding.step or 0


def create_embedding(sd_model, folder: Path, name: str, *, init_text: str = "*", vectors: int = 1,
                     suffix: str = ".pt", overwrite: bool = False) -> Path:
    """A new embedding whose vectors start as the token embeddings of `init_text` (repeated to
    fill them, as A1111 does; zeros for an empty text)."""
    name = check_name(name)
    if not 1 <= vectors <= MAX_VECTORS:
        raise TrainingError(f"vectors per token must be between 1 and {MAX_VECTORS}, got {vectors}")
    if suffix not in EMBEDDING_SUFFIXES:
        raise TrainingError(f"embedding files are {' or '.join(EMBEDDING_SUFFIXES)}, not {suffix!r}")
    path = Path(folder) / f"{name}{suffix}"
    existing = [p for p in (path.with_suffix(s) for s in EMBEDDING_SUFFIXES) if p.exists()]
    if existing and not overwrite:
        raise TrainingError(f"an embedding named {name} already exists ({existing[0].name}); tick Overwrite to replace it")
    table = token_table(sd_model)
    ids = tokenize([init_text or ""])[0]
    with torch.no_grad():
        rows = table.weight[torch.tensor([ids[i % len(ids)] for i in range(vectors)])] if ids else None
        initial = rows if rows is not None else torch.zeros(vectors, table.embedding_dim)
    for stale in existing:
        stale.unlink()
    return save_embedding(path, initial, step=0)


# ---- text encoding with trainable vectors -------------------------------------------------------


def token_table(sd_model) -> torch.nn.Embedding:
    """The token embeddings that new vectors start from and are trained beside. Training is for
    models with one text encoder (SD 1.x and 2.x); an SDXL embedding needs vectors for both."""
    encoders = sd_model.text_encoders
    if len(encoders) != 1 or sd_model.spec.vector is not None:
        raise TrainingError(f"textual-inversion training works with SD 1.x and 2.x models; this is {sd_model.spec.family}")
    return encoders[0].token_embedding


def prompt_row(template: str, words: str, vectors: int) -> tuple[list[int], list[int]]:
    """(77 token ids, positions of the embedding's vectors) for a template line: each `[name]`
    takes `vectors` positions, `[filewords]` is replaced by `words`; cut to one chunk."""
    pieces = tokenize(template.replace("[filewords]", words).split("[name]"))
    ids: list[int] = []
    slots: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            slots.extend(range(len(ids) + 1, len(ids) + 1 + vectors))
            ids.extend([PLACEHOLDER_ID] * vectors)  # never the end token, which OpenCLIP pools at
        ids.extend(piece)
    ids = ids[:CHUNK_TOKENS]
    slots = [s for s in slots if s <= CHUNK_TOKENS]
    return [BOS_ID, *ids, *[PAD_ID] * (CHUNK_TOKENS - len(ids)), EOS_ID], slots


def encode_with_vectors(sd_model, rows: list[list[int]], slots: list[list[int]], vectors: torch.Tensor,
                        clip_skip: int = 1) -> torch.Tensor:
    """[B, 77, hidden]: the text encoder's output with `vectors` at each row's slots (runs of
    `len(vectors)` positions, the last run perhaps cut short by the chunk's end), differentiable
    with respect to `vectors`."""
    device = token_table(sd_model).weight.device
    count = vectors.shape[0]
    placed = [(b, row[i], vectors[: len(row[i:i + count])]) for b, row in enumerate(slots) for i in range(0, len(row), count)]
    return sd_model.encode_text(torch.tensor(rows, device=device), clip_skip, replace=placed)[0]


# ---- training -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingOptions:
    embedding: str
    dataset: Path
    template: Path
    learn_rate: str = "0.005"
    batch_size: int = bounded(1, 1, 64)
    gradient_steps: int = bounded(1, 1, 1000)
    size: int = bounded(512, 8, 4096)
    steps: int = bounded(1000, 1, MAX_STEPS)
    save_every: int = bounded(500, 0, MAX_STEPS)  # 0: only at the end
    preview_every: int = bounded(500, 0, MAX_STEPS)  # 0: never
    shuffle_tags: bool = False
    tag_dropout: float = bounded(0.0, 0, 1, whole=False)
    latent_sampling: str = one_of("once", ti_dataset.LATENT_SAMPLING)
    clip_skip: int = bounded(1, 1, 12)
    seed: int = 0

    def validate(self) -> "TrainingOptions":
        problems = fields.problems(self)
        try:
            parse_schedule(self.learn_rate)
        except ValueError as e:
            problems.append(f"learning rate: {e}")
        if problems:
            raise TrainingError("; ".join(problems))
        return replace(self, embedding=check_name(self.embedding))


@dataclass
class TrainingResult:
    path: Path
    step: int
    loss: float | None
    interrupted: bool
    previews: list[Path]
    seconds: float


def find_embedding(folder: Path, name: str) -> Path:
    for suffix in EMBEDDING_SUFFIXES:
        path = Path(folder) / f"{name}{suffix}"
        if path.is_file():
            return path
    raise TrainingError(f"no embedding named {name} in {folder}; create it first")


def train_embedding(sd_model, options: TrainingOptions, *, embeddings_dir: Path, log_dir: Path,
                    job: Job | None = None, checkpoint_hash: str | None = None, checkpoint_name: str | None = None,
                    preview: Callable[[str, int], Image.Image] | None = None,
                    using: Callable[[str], contextlib.AbstractContextManager] = pipeline.no_offload,
                    device: torch.device | None = None) -> TrainingResult:
    """Trains the embedding file in `embeddings_dir` from its saved step to `options.steps`, on
    `device` (None: where the text encoder is), with `using(part)` putting each part of the
    model there while it works (offload modes, as in pipeline.sample_latents).

    Copies of the embedding every `save_every` steps and previews every `preview_every` steps
    go to `log_dir/<date>/<name>/`. `preview(prompt, step)` draws a picture with the embedding
    as saved at that step. The job's interrupt flag stops training after the current step; the
    embedding is then saved as it is, like at the end."""
    options = options.validate()
    job = job or Job()
    started = time.monotonic()
    path = find_embedding(embeddings_dir, options.embedding)
    initial, step = read_embedding(path)
    table = token_table(sd_model)
    if initial.shape[-1] != table.embedding_dim:
        raise TrainingError(f"{path.name} has vectors of size {initial.shape[-1]}, the model's text encoder uses {table.embedding_dim}")
    templates = ti_dataset.read_templates(options.template)
    if missing := [line for line in templates if "[name]" not in line]:
        raise TrainingError(f"every line of the prompt template {Path(options.template).name} needs [name], or the "
                            f"embedding learns nothing from it; this one has none: {missing[0]!r}")
    with using("vae"):
        pictures = ti_dataset.load_pictures(sd_model, options.dataset, size=options.size,
                                            latent_sampling=options.latent_sampling, seed=options.seed)
    schedule = parse_schedule(options.learn_rate)
    last_step = min(options.steps, schedule.end_step or options.steps)
    out_dir = Path(log_dir) / date.today().isoformat() / options.embedding
    info = {"checkpoint_hash": checkpoint_hash, "checkpoint_name": checkpoint_name}

    device = device or table.weight.device
    vectors = torch.nn.Parameter(initial.to(device, torch.float32))
    optimizer = torch.optim.AdamW([vectors], lr=schedule.rate(step + 1) or 0.0, weight_decay=0.0)
    # Random choices follow from the seed and the starting step: the same run twice gives the same vectors.
    rng = random.Random(f"{options.seed}-{step}")
    generator = torch.Generator().manual_seed(options.seed * 1_000_003 + step)
    alphas = sd_model.alphas_cumprod.float().cpu()
    order: list[int] = []
    job.total_steps, job.step = last_step, step
    previews: list[Path] = []
    loss_value = None

    def save_copy(kind: str, suffix: str) -> Path:
        return out_dir / kind / f"{options.embedding}-{step}{suffix}"

    sd_model.requires_grad_(False)
    while step < last_step and not job.interrupted:
        for group in optimizer.param_groups:
            group["lr"] = schedule.rate(step + 1)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(options.gradient_steps):
            batch = []
            for _ in range(options.batch_size):
                if not order:
                    order = list(range(len(pictures)))
                    rng.shuffle(order)
                batch.append(pictures[order.pop()])
            rows, slots = zip(*(
                prompt_row(rng.choice(templates),
                           ti_dataset.filewords(p.caption, rng, shuffle=options.shuffle_tags, dropout=options.tag_dropout),
                           vectors.shape[0])
                for p in batch))
            x0 = torch.stack([ti_dataset.latent_for(p, options.latent_sampling, generator) for p in batch])
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(0, len(alphas), (len(batch),), generator=generator)
            alpha_bar = alphas[t].view(-1, 1, 1, 1)
            x_t = noised(x0, noise, alpha_bar)
            # Both parts stay on the device until the backward pass, which goes through them; the
            # previews between steps use (and offload) them too, so they are taken step by step.
            with using("text"), using("unet"):
                context = encode_with_vectors(sd_model, list(rows), list(slots), vectors, options.clip_skip)
                model_dtype = next(sd_model.model.parameters()).dtype
                prediction = sd_model.apply_model(x_t.to(device, model_dtype), t.to(device).float(), context.to(model_dtype))
                loss = F.mse_loss(prediction.float(), diffusion_target(sd_model.prediction, x0, noise, alpha_bar).to(device))
                (loss / options.gradient_steps).backward()
            total += loss.item() / options.gradient_steps
        if not math.isfinite(total):
            raise TrainingError(f"the loss became {total} at step {step + 1}; lower the learning rate")
        optimizer.step()
        step += 1
        loss_value = total
        job.step = step
        job.status = f"step {step}/{last_step}, loss {total:.4f}"
        if options.save_every and step % options.save_every == 0 and step < last_step:
            save_embedding(path, vectors, step=step, **info)
            save_embedding(save_copy("embeddings", path.suffix), vectors, step=step, **info)
        if preview is not None and options.preview_every and step % options.preview_every == 0:
            save_embedding(path, vectors, step=step, **info)
            prompt = ti_dataset.fill_template(templates[0], options.embedding, pictures[0].caption)
            image = preview(prompt, step)
            png = storage.png_bytes(image, prompt)
            previews.append(atomic_write(save_copy("images", ".png"), lambda f: f.write(png)))
            job.preview, job.preview_id = image, job.preview_id + 1

    save_embedding(path, vectors, step=step, **info)
    return TrainingResult(path, step, loss_value, bool(job.interrupted), previews, time.monotonic() - started)


# ---- in the app: the checkpoint in use, its hash, previews through the pipeline -----------------


def embedding_names(folder: Path) -> list[str]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted({p.stem for p in folder.iterdir() if p.suffix in EMBEDDING_SUFFIXES and p.is_file()}, key=str.lower)


def template_files(folders: list[Path]) -> dict[str, Path]:
    """Template file name -> path; a user's file shadows a shipped one of the same name."""
    found: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.glob("*.txt")):
                found.setdefault(path.name, path)
    return found


def create_in_app(ctx, name: str, init_text: str, vectors: int, suffix: str = ".pt", overwrite: bool = False,
                  checkpoint: str | None = None) -> Path:
    """Creates the embedding for `checkpoint`'s text encoders (None: the server's default); run
    it as a queued job, as it may load the checkpoint."""
    sd_model = ctx.models.get(checkpoint)
    return create_embedding(sd_model, ctx.paths.embeddings, name, init_text=init_text, vectors=vectors,
                            suffix=suffix, overwrite=overwrite)


def train_in_app(ctx, options: TrainingOptions, checkpoint: str | None = None, job: Job | None = None) -> TrainingResult:
    """Trains with `checkpoint` (None: the server's default); previews are drawn as txt2img draws
    them, with the embedding as just saved, at the training size and a fixed seed so they can be
    compared. The dataset folder must lie under the data folder or an --allowed-path one."""
    options = replace(options, dataset=ctx.paths.server_folder(options.dataset, "dataset directory"))
    if ctx.models.policy.offload == "lowvram":
        raise TrainingError("training an embedding needs the whole UNet on the GPU for the backward pass, which "
                            "--lowvram does not keep there; restart without --lowvram (--medvram works)")
    sd_model = ctx.models.get(checkpoint)
    info = sd_model.checkpoint

    def preview(prompt: str, step: int) -> Image.Image:
        request = GenerationRequest(prompt=prompt, width=options.size, height=options.size, seed=options.seed, steps=20,
                                    checkpoint=info.title)
        return pipeline.generate(ctx, request, save=False).images[0]

    try:
        with torch.inference_mode(False), torch.enable_grad():
            return train_embedding(sd_model, options, embeddings_dir=ctx.paths.embeddings,
                                   log_dir=ctx.paths.textual_inversion, job=job, checkpoint_hash=ctx.models.hash_of(info),
                                   checkpoint_name=info.name, preview=preview,
                                   using=lambda part: ctx.models.using(sd_model, part), device=ctx.models.policy.device)
    finally:
        ctx.models.release()  # medvram would keep the UNet, the last part a step uses, on the GPU
