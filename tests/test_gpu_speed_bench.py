"""bench/gpu_speed.py in its tiny CPU mode: every case measured on both sides, and the two sides
compared like for like (the same weights, noise, conditioning and noise levels end in the same
latents)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_speed
from modules.models import loader


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "speed.json"
    figures = gpu_speed.main(["--device", "cpu", "--tiny", "--steps", "2", "--repeats", "1", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(figures))
    return figures


def test_every_case_has_positive_figures_for_both_sides(report):
    assert report["tiny"] and report["dtype"] == "float32" and report["sides"] == ["ours", "diffusers"]
    assert set(report["cases"]) == {c.key for c in gpu_speed.CASES}
    for key, case in report["cases"].items():
        assert "error" not in case, (key, case.get("error"))
        assert case["size"] == gpu_speed.TINY_SIZE and case["steps"] == 2
        for side in ("ours", "diffusers"):
            figures = case[side]
            assert figures["it_s"] > 0 and figures["s_per_picture"] > 0, (key, side)
            assert len(figures["sampling_s"]) == len(figures["end_to_end_s"]) == 1
            assert figures["peak_gib"] is None  # no GPU memory to report on the CPU
        assert case["ours / diffusers"]["it_s"] > 0
    for family in ("SD1", "SDXL"):
        assert report["model_hash_s"][family] > 0
        assert all(report["first_picture"][family][side]["seconds"] > 0 for side in ("ours", "diffusers"))


def test_both_sides_end_in_the_same_latents(report):
    for key, case in report["cases"].items():
        compared = case["ours / diffusers"]
        assert compared["latent_std"] > 1, key  # latents of a real run, not zeros
        assert compared["latent_max_difference"] < 2e-4 * compared["latent_std"], key


def test_sdxl_conditioning_reaches_both_sides_alike(tmp_path):
    """The match is no accident of inputs that do not matter: a different pooled text (SDXL's
    vector input) or negative prompt moves both sides' latents far, and equally."""
    path = gpu_speed.checkpoint_file("SDXL", True, tmp_path)
    folder = tmp_path / "data" / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    for beside in (path, path.with_suffix(".yaml")):
        (folder / beside.name).symlink_to(beside)
    cpu = torch.device("cpu")
    ours = gpu_speed.Ours(tmp_path / "data", path.name, cpu, "fp32")
    theirs = gpu_speed.Diffusers(path, cpu, torch.float32)
    case = next(c for c in gpu_speed.CASES if c.family == "SDXL")
    inputs = gpu_speed.loop_inputs(case, gpu_speed.TINY_SIZE, 2, loader.read_spec(path))
    pooled = gpu_speed.LoopInputs(**{**vars(inputs), "pooled": inputs.pooled * -1})
    negative = gpu_speed.LoopInputs(**{**vars(inputs), "negative_context": inputs.context})
    first = ours.sample(inputs)
    torch.testing.assert_close(first, theirs.sample(inputs), rtol=1e-4, atol=1e-3)
    for changed in (pooled, negative):
        again = ours.sample(changed)
        assert (again - first).abs().max() > 0.05 * first.std()
        torch.testing.assert_close(again, theirs.sample(changed), rtol=1e-4, atol=1e-3)
