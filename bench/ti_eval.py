"""Does a trained embedding teach the built-in model something it never saw?

    venv/bin/python bench/ti_eval.py [--steps 400] [--n 50]

The concept is a (colour, shape) pair held out of the built-in model's training (see
modules/training/shapes_dataset.py): never drawn as a whole, so no word of its vocabulary names
it. Pictures of it (various positions and backgrounds, captions naming only the background and
position) are drawn by the dataset code, an embedding is trained on them with the Train tab's
backend, and then the same prompts are generated with the embedding's name resolved by the
embeddings folder and with the name as a plain unknown word. Each picture is scored by reading
back its shape's colour and type. Prints both rates and the training time.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.builtin_model_eval import DEFAULT_MODEL, generate, load_model  # noqa: E402
from modules.networks.embeddings import EmbeddingDatabase  # noqa: E402
from modules.training import shapes_dataset as shapes  # noqa: E402
from modules.training import textual_inversion as ti  # noqa: E402

CONCEPT = ("orange", "triangle")
NAME = "zq-concept"
TEMPLATE = "a [name], [filewords]"
BACKGROUNDS = ("white", "black", "yellow", "green", "blue", "purple")  # never the concept's colour


def concept_scene(rng: random.Random) -> shapes.Scene:
    colour, shape = CONCEPT
    spec = shapes.ShapeSpec(shape=shape, colour=colour, size="large", position=rng.choice(list(shapes.POSITIONS)),
                            dx=rng.uniform(-1, 1) * shapes.JITTER_POSITION, dy=rng.uniform(-1, 1) * shapes.JITTER_POSITION,
                            scale=1 + rng.uniform(-1, 1) * shapes.JITTER_SCALE)
    return shapes.Scene(background=rng.choice(BACKGROUNDS), shapes=(spec,))


def draw_dataset(folder: Path, count: int, size: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(count):
        scene = concept_scene(rng)
        Image.fromarray(shapes.render(scene, size)).save(folder / f"{i:03}.png")
        (folder / f"{i:03}.txt").write_text(f"on a {scene.background} background")


def concept_rate(sd_model, prompts: list[str], table, seed: int) -> float:
    hits = 0
    for i, prompt in enumerate(prompts):
        found = shapes.read_scene(generate(sd_model, prompt, seed + i, embeddings=table))
        hits += (found["colour"], found["shape"]) == CONCEPT
    return hits / len(prompts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--pictures", type=int, default=24)
    p.add_argument("--vectors", type=int, default=2)
    p.add_argument("--learn-rate", default="0.02:200, 0.005")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--n", type=int, default=50, help="pictures generated with and without the embedding")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sd_model = load_model(args.model)
    size = sd_model.spec.resolution

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "pictures").mkdir()
        (root / "embeddings").mkdir()
        draw_dataset(root / "pictures", args.pictures, size, seed=1)
        (root / "template.txt").write_text(TEMPLATE + "\n")
        ti.create_embedding(sd_model, root / "embeddings", NAME, init_text="shape", vectors=args.vectors)
        options = ti.TrainingOptions(embedding=NAME, dataset=root / "pictures", template=root / "template.txt",
                                     learn_rate=args.learn_rate, batch_size=args.batch, size=size, steps=args.steps,
                                     save_every=0, preview_every=0, latent_sampling="deterministic")
        started = time.perf_counter()
        result = ti.train_embedding(sd_model, options, embeddings_dir=root / "embeddings", log_dir=root / "log")
        seconds = time.perf_counter() - started

        rng = random.Random(7)
        prompts = [f"a {NAME}, on a {rng.choice(BACKGROUNDS)} background" for _ in range(args.n)]
        database = EmbeddingDatabase(root / "embeddings")
        width = ti.token_table(sd_model).embedding_dim
        with_embedding = concept_rate(sd_model, prompts, database.table(width), seed=1000)
        without = concept_rate(sd_model, prompts, None, seed=1000)

    colour, shape = CONCEPT
    print(f"concept: {colour} {shape} (held out of the built-in model's training); {args.pictures} pictures, "
          f"{args.vectors} vectors, {result.step} steps of batch {args.batch}, lr {args.learn_rate}, {args.threads} threads")
    print(f"training: {seconds:.0f} s ({seconds / max(1, result.step):.2f} s per step), last loss {result.loss:.4f}")
    print(f"concept drawn with the embedding:    {100 * with_embedding:.0f}% of {args.n}  (target >= 70%)")
    print(f"concept drawn without the embedding: {100 * without:.0f}% of {args.n}  (target <= 10%)")


if __name__ == "__main__":
    main()
