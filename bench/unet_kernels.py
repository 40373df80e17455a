"""Operations per UNet step, ours against diffusers' UNet2DConditionModel, counted without a GPU.

    venv/bin/python bench/unet_kernels.py [--family sd1 sd2 sdxl] [--batch 2] [--dtype fp16] [--channels-last]

At batch 1 on a fast GPU a UNet step is bound by launching its kernels, not by running them, so
the number of operations that launch one is what a GPU's it/s follows there. Both full-size
models are built on the meta device (no memory, no arithmetic) and run once under a dispatch
mode that counts every PyTorch operation reaching the kernels; views (reshapes, transposes),
and allocations, which launch nothing, are counted apart; each attention counts as the one fused
kernel it is on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.models.detect import full_size_spec  # noqa: E402
from modules.models.unet import UNetModel  # noqa: E402
from tests.reference_models import diffusers_unet_config  # noqa: E402

FAMILIES = {"sd1": ("SD1", "SD 1.5", 64), "sd2": ("SD2", "SD 2.1", 96), "sdxl": ("SDXL", "SDXL base", 128)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# Operations that launch no kernel: views under another name, and allocations.
NO_KERNEL = {"_unsafe_view", "empty", "new_empty", "empty_like", "empty_strided"}


class Counter(TorchDispatchMode):
    """Counts the operations dispatched inside it: kernels, and views apart."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: collections.Counter = collections.Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket).removeprefix("aten.")
        if func.is_view or name in NO_KERNEL:
            self.views += 1
        else:
            self.kernels[name] += 1
        return func(*args, **(kwargs or {}))


class FusedAttention(TorchFunctionMode):
    """Counts each attention as the one fused kernel it is on a GPU (the meta device would
    decompose it into a dozen), handing on an empty output of the right shape."""

    def __init__(self, counter: Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.counter.kernels["scaled_dot_product_attention"] += 1
            q, v = args[0], args[2]
            return q.new_empty((*q.shape[:-1], v.shape[-1]))
        return func(*args, **(kwargs or {}))


def models(family: str, dtype: torch.dtype, channels_last: bool):
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its advice on casting loaded models does not apply here

    spec = full_size_spec(family)
    with torch.device("meta"):
        ours = UNetModel(**spec.unet)
        theirs = UNet2DConditionModel(**diffusers_unet_config(spec.unet, ours))
    memory = torch.channels_last if channels_last else torch.contiguous_format
    return spec, ours.to(dtype=dtype, memory_format=memory), theirs.to(dtype=dtype, memory_format=memory)


def count(family: str, batch: int, dtype: torch.dtype, channels_last: bool) -> dict[str, Counter]:
    spec, ours, theirs = models(family, dtype, channels_last)
    latent = FAMILIES[next(k for k, v in FAMILIES.items() if v[0] == family)][2]

    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=dtype)

    x = meta(batch, 4, latent, latent)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.empty(batch, device="meta")
    context = meta(batch, 77, spec.unet["context_dim"])
    ours_extra, theirs_extra = {}, {}
    if spec.vector is not None:
        ours_extra["y"] = meta(batch, spec.unet["adm_in_channels"])
        theirs_extra["added_cond_kwargs"] = {"text_embeds": meta(batch, spec.unet["adm_in_channels"] - 6 * 256),
                                             "time_ids": meta(batch, 6)}
    counters = {"ours": Counter(), "diffusers": Counter()}
    with torch.no_grad():
        with counters["ours"], FusedAttention(counters["ours"]):
            ours(x, t, context, **ours_extra)
        with counters["diffusers"], FusedAttention(counters["diffusers"]):
            theirs(x, t, encoder_hidden_states=context, **theirs_extra)
    return counters


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES))
    p.add_argument("--batch", type=int, default=2, help="2 = one picture with classifier-free guidance")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--channels-last", action="store_true", help="weights and latents in channels-last order")
    p.add_argument("--top", type=int, default=6, help="how many of the commonest kernels to list")
    args = p.parse_args(argv)
    print(f"UNet step, batch {args.batch}, {args.dtype}{', channels last' if args.channels_last else ''}: "
          "operations launching a kernel (views apart)")
    for name in args.family:
        family, title, latent = FAMILIES[name]
        counters = count(family, args.batch, DTYPES[args.dtype], args.channels_last)
        ours, theirs = (sum(c.kernels.values()) for c in counters.values())
        print(f"  {title} ({latent * 8} px): ours {ours}, diffusers {theirs}, ratio {ours / theirs:.2f}   "
              f"(views: {counters['ours'].views} against {counters['diffusers'].views})")
        for side, counter in counters.items():
            common = ", ".join(f"{op} {n}" for op, n in counter.kernels.most_common(args.top))
            print(f"    {side:9s} {common}")


if __name__ == "__main__":
    main()
