"""Does a trained embedding teach the built-in model something it never saw?

    venv/bin/python bench/ti_eval.py [--steps 400] [--n 50]

The concept is a (colour, shape) pair held out of the built-in model's training (see
modules/training/shapes_dataset.py): never drawn as a whole, so no word of its vocabulary names
it. Pictures of it (various positions, four backgrounds, captions naming only the background)
are drawn by the dataset code and an embedding is trained on them with the Train tab's backend.
Two prompt sets are then generated, each with the embedding's name resolved by the embeddings
folder and with the name as a plain unknown word: the training captions' own form, and prompts
the embedding was not trained on (another template, naming a position, on backgrounds it never
saw). Each picture is scored by reading back its shape's colour and type (the concept drawn)
and its background. Prints the rates and the training time.
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
# Never the concept's colour. The embedding learns on the first four; the others test whether it
# goes with backgrounds it never saw.
BACKGROUNDS = ("white", "black", "yellow", "green")
UNSEEN_BACKGROUNDS = ("blue", "purple", "red")


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


def training_prompts(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """(prompt, background) in the form of the training captions, on the training backgrounds."""
    return [(f"a {NAME}, on a {bg} background", bg) for bg in (rng.choice(BACKGROUNDS) for _ in range(n))]


def unseen_prompts(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """(prompt, background) in a form the embedding was not trained on, on backgrounds it never saw."""
    places = [phrase for phrases in shapes.POSITION_PHRASES.values() for phrase in phrases]
    prompts = []
    for _ in range(n):
        place, bg = rng.choice(places), rng.choice(UNSEEN_BACKGROUNDS)
        prompts.append((f"a drawing of a {NAME} {place} against a {bg} background", bg))
    return prompts


def rates(sd_model, prompts: list[tuple[str, str]], table, seed: int) -> tuple[float, float]:
    """(share of pictures showing the concept, share with the prompt's background)."""
    concept = background = 0
    for i, (prompt, wanted) in enumerate(prompts):
        found = shapes.read_scene(generate(sd_model, prompt, seed + i, embeddings=table))
        concept += (found["colour"], found["shape"]) == CONCEPT
        background += found["background"] == wanted
    return concept / len(prompts), background / len(prompts)


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
        prompt_sets = {"training captions": training_prompts(args.n, rng), "unseen prompts": unseen_prompts(args.n, rng)}
        database = EmbeddingDatabase(root / "embeddings")
        table = database.table(ti.token_table(sd_model).embedding_dim)
        results = {(name, used): rates(sd_model, prompts, table if used else None, seed=1000)
                   for name, prompts in prompt_sets.items() for used in (True, False)}

    colour, shape = CONCEPT
    print(f"concept: {colour} {shape} (held out of the built-in model's training); {args.pictures} pictures, "
          f"{args.vectors} vectors, {result.step} steps of batch {args.batch}, lr {args.learn_rate}, {args.threads} threads")
    print(f"training: {seconds:.0f} s ({seconds / max(1, result.step):.2f} s per step), last loss {result.loss:.4f}")
    print(f"training captions: 'a {NAME}, on a <{'|'.join(BACKGROUNDS)}> background'")
    print(f"unseen prompts:    'a drawing of a {NAME} <position> against a <{'|'.join(UNSEEN_BACKGROUNDS)}> background'")
    for (name, used), (concept, background) in results.items():
        print(f"{name}, {'with' if used else 'without'} the embedding: concept drawn {100 * concept:.0f}%, "
              f"background as asked {100 * background:.0f}% of {args.n}")


if __name__ == "__main__":
    main()
