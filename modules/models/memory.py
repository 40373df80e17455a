"""ModelManager: which checkpoint is loaded, on which device, in which precision, and what is offloaded.

Offload modes move weights with forward hooks registered on the model's own submodules (PyTorch's
public hook API), so the model code knows nothing about where its weights live.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.app.config import Flags, Paths
from modules.models import loader
from modules.models.detect import ModelSpec

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt")
BUILTIN_PREFIX = "builtin-"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    title: str  # path relative to the checkpoint folder, as shown in the dropdown

    @property
    def name(self) -> str:
        """What A1111 writes as 'Model:' in the infotext: the file name without its extension."""
        return self.path.stem

    @property
    def config(self) -> Path | None:
        """The .yaml config beside the checkpoint (see loader.read_config), if there is one."""
        path = loader.config_path(self.path)
        return path if path.is_file() else None


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """Whether this processor computes bfloat16 in hardware (AVX-512 BF16 or AMX), where PyTorch's
    bfloat16 matrix products and convolutions run about three times as fast as float32's."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: read the processor's flags
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


# The precision policy, first matching rule wins: (applies to (flags, on a GPU, fast bfloat16 on
# this CPU), the precision (None: the one --precision names), why).
PRECISION_RULES: tuple[tuple[Callable[[Flags, bool, bool], bool], str | None, str], ...] = (
    (lambda flags, gpu, bf16: flags.no_half, "fp32", "--no-half"),
    (lambda flags, gpu, bf16: flags.precision != "auto", None, "--precision"),
    (lambda flags, gpu, bf16: gpu, "fp16", "a CUDA GPU computes float16 fast"),
    (lambda flags, gpu, bf16: bf16, "bf16", "this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX)"),
    (lambda flags, gpu, bf16: True, "fp32", "this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX)"),
)


@dataclass(frozen=True)
class DevicePolicy:
    device: torch.device
    dtype: torch.dtype  # the UNet's and the text encoders'
    vae_dtype: torch.dtype
    offload: str  # "none" | "medvram" | "lowvram"
    reason: str = ""  # why this precision, for the console and the Settings tab

    @classmethod
    def from_flags(cls, flags: Flags, fast_bf16: Callable[[], bool] = cpu_has_fast_bf16) -> "DevicePolicy":
        name = flags.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {flags.device}: no CUDA device is available on this machine")
        if flags.precision != "auto" and flags.precision not in DTYPES:
            raise SystemExit(f"--precision {flags.precision}: choose auto, {', '.join(DTYPES)}")
        on_gpu = device.type == "cuda"
        bf16 = not on_gpu and fast_bf16()
        precision, why = next((p or flags.precision, why) for rule, p, why in PRECISION_RULES if rule(flags, on_gpu, bf16))
        dtype = DTYPES[precision]
        vae_dtype = torch.float32 if flags.no_half_vae else dtype
        offload = "lowvram" if flags.lowvram and on_gpu else "medvram" if flags.medvram and on_gpu else "none"
        vae = " (VAE float32: --no-half-vae)" if flags.no_half_vae and dtype != torch.float32 else ""
        return cls(device, dtype, vae_dtype, offload, f"{str(dtype).removeprefix('torch.')} on {device}{vae}: {why}")

    @property
    def channels_last(self) -> bool:
        """Convolution weights in channels-last order: oneDNN's bfloat16 convolutions on a CPU run
        faster so (bench/cpu_speed.py measures it on the VAE decode)."""
        return self.device.type == "cpu" and self.dtype == torch.bfloat16

    @property
    def upscaler_dtype(self) -> torch.dtype:
        """Upscaler networks run in half precision on a GPU only: not all of them are made for
        bfloat16, and on a CPU they are a small part of the time."""
        return self.dtype if self.device.type == "cuda" else torch.float32


def place(model, policy: DevicePolicy):
    """Puts a freshly loaded model in the policy's precision, and on its device unless offloading
    keeps it on the CPU. Files keep the dtype they were saved in (the built-in model is fp16),
    whatever the machine computes fast."""
    # The networks only: the noise schedule (alphas_cumprod) stays float32, since its values near
    # 1 round to 1 in bfloat16 and the lowest noise levels would become 0.
    model.model.to(dtype=policy.dtype)
    model.text_model.to(dtype=policy.dtype)
    model.first_stage_model.to(dtype=policy.vae_dtype)
    if policy.channels_last:
        model.model.to(memory_format=torch.channels_last)
        model.first_stage_model.to(memory_format=torch.channels_last)
    if policy.offload == "none":
        model.to(policy.device)
    return model


PARTS = {
    "text": "text_model",
    "unet": "model",
    "vae": "first_stage_model",
}


class ModelManager:
    """Owns the loaded SDModel (and a refiner's, while jobs use one); loading another checkpoint
    replaces it."""

    def __init__(self, paths: Paths, policy: DevicePolicy, default: str | None = None) -> None:
        self.paths = paths
        self.policy = policy
        self.default = default  # the server's default checkpoint: --ckpt or the settings file
        log.info("Precision: %s", policy.reason)
        # "main" and "refiner" -> (what was loaded: path, file version, VAE file; the SDModel)
        self._slots: dict[str, tuple[tuple, object]] = {}
        self.loads = 0  # checkpoint files read since start, which a scale-out replica reports
        self._header_specs: dict[tuple, ModelSpec | None] = {}  # (path, file version) -> spec_of's answer
        self._lock = threading.Lock()

    # -- listing -------------------------------------------------------------------------------

    def checkpoints(self) -> list[CheckpointInfo]:
        """The data folder's checkpoints, the built-in model first (the default on a fresh clone);
        then the models shipped with the code that the data folder lacks, so that a new data
        folder can generate too."""
        root = self.paths.checkpoints
        files = [p for p in root.rglob("*") if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file()] if root.is_dir() else []
        infos = sorted((CheckpointInfo(p, p.relative_to(root).as_posix()) for p in files),
                       key=lambda c: (not c.path.name.startswith(BUILTIN_PREFIX), c.title.lower()))
        titles = {c.title for c in infos}
        shipped = sorted(self.paths.shipped_checkpoints.glob(f"{BUILTIN_PREFIX}*.safetensors"))
        return infos + [CheckpointInfo(p, p.name) for p in shipped if p.name not in titles]

    def vaes(self) -> list[Path]:
        root = self.paths.vae
        return sorted(p for p in root.rglob("*") if p.suffix.lower() in VAE_SUFFIXES and p.is_file()) if root.is_dir() else []

    def vae_for(self, checkpoint: CheckpointInfo, choice: str) -> Path | None:
        """The VAE file to use: "None" keeps the checkpoint's own, "Automatic" takes a file named like the
        checkpoint (beside it as NAME.vae.* or in models/VAE as NAME.*), anything else names a file in models/VAE."""
        if choice == "None":
            return None
        if choice == "Automatic":
            stem = checkpoint.path.stem
            candidates = [checkpoint.path.with_name(f"{stem}.vae{suffix}") for suffix in VAE_SUFFIXES]
            candidates += [p for p in self.vaes() if p.stem == stem]
            return next((p for p in candidates if p.is_file()), None)
        for path in self.vaes():
            if choice in (path.name, path.relative_to(self.paths.vae).as_posix()):
                return path
        known = ", ".join(p.name for p in self.vaes()) or "none in models/VAE"
        raise LookupError(f"VAE {choice!r} not found. Available: Automatic, None, {known}")

    def find_checkpoint(self, name: str) -> CheckpointInfo:
        """Accepts the dropdown title, the file name, the stem, or 'title [hash]' as A1111 clients send it."""
        wanted = name.split(" [")[0].strip()
        for info in self.checkpoints():
            if wanted in (info.title, info.path.name, info.name):
                return info
        known = ", ".join(c.title for c in self.checkpoints()) or "none: put .safetensors or .ckpt files in models/Stable-diffusion"
        raise LookupError(f"Checkpoint {name!r} not found. Available: {known}")

    def default_checkpoint(self) -> CheckpointInfo | None:
        if self.default:
            with contextlib.suppress(LookupError):
                return self.find_checkpoint(self.default)
        found = self.checkpoints()
        return found[0] if found else None

    def hash_of(self, info: CheckpointInfo) -> str:
        return loader.model_hash(info.path, self.paths.hash_cache)

    # -- loading -------------------------------------------------------------------------------

    def get(self, name: str | None = None, vae_choice: str = "Automatic", *, refiner: bool = False):
        """The SDModel for `name` (or the server's default) with the chosen VAE, loading it if it
        is not in memory. The refiner (`refiner=True`) has a place of its own beside the main
        model, so a job that switches to it does not load either again. Loading never changes
        the default: each request names its checkpoint. Call it only from a queued job, so that
        a load never happens beside a running job."""
        info = self.find_checkpoint(name) if name else self.default_checkpoint()
        if info is None:
            raise LookupError("No checkpoint found: put a .safetensors or .ckpt file in models/Stable-diffusion")
        vae = self.vae_for(info, vae_choice)
        key = (info.path, info.path.stat().st_mtime_ns, vae)
        slot, other = ("refiner", "main") if refiner else ("main", "refiner")
        with self._lock:
            if self._slots.get(slot, (None,))[0] != key:
                self._slots.pop(slot, None)  # drop the old model before the new one takes its memory
                if self._slots.get(other, (None,))[0] == key:
                    model = self._slots[other][1]
                else:
                    model = loader.load_checkpoint(info.path, vae_path=vae)
                    self.loads += 1
                    spec = model.spec
                    log.info("Loaded %s: %s, predicts %s, %d px%s", info.title, spec.family, spec.prediction,
                             spec.resolution, ", zero-terminal-SNR schedule" if spec.ztsnr else "")
                    self._place(model)
                    model.checkpoint = info
                    model.vae_file = vae
                self._slots[slot] = (key, model)
            return self._slots[slot][1]

    def spec_of(self, name: str | None = None) -> ModelSpec | None:
        """A checkpoint's spec without loading it: the model's in memory, else what its file's
        header implies (None when only loading can tell)."""
        info = self.find_checkpoint(name) if name else self.default_checkpoint()
        if info is None:
            return None
        for _, model in self._slots.values():
            if model.checkpoint.path == info.path:
                return model.spec
        # Read once per file version: the token counters ask at every keystroke.
        key = (info.path, info.path.stat().st_mtime_ns)
        if key not in self._header_specs:
            self._header_specs[key] = loader.read_spec(info.path)
        return self._header_specs[key]

    @property
    def _loaded(self):
        return self._slots.get("main", (None, None))[1]

    def loaded_resolution(self) -> int | None:
        """Native resolution of the model in memory, for the UI's default width and height."""
        model = self._loaded
        return model.spec.resolution if model is not None else None

    def loaded_text_width(self) -> int | None:
        """Context width of the model in memory, which textual-inversion embeddings must match."""
        model = self._loaded
        return model.text_width if model is not None else None

    def unload(self) -> None:
        with self._lock:
            self._slots.clear()

    def _place(self, model) -> None:
        place(model, self.policy)
        if self.policy.offload == "lowvram":
            self._stream_unet_blocks(model.model.diffusion_model)

    def _stream_unet_blocks(self, unet: torch.nn.Module) -> None:
        """Lowvram: each top-level UNet block visits the GPU only for its own forward."""
        device = self.policy.device

        # Both return None: a hook's return value would replace the block's input or output.
        def arrive(block, args) -> None:
            block.to(device)

        def leave(block, args, output) -> None:
            block.to("cpu")

        blocks = [b for child in unet.children() for b in (child if isinstance(child, torch.nn.ModuleList) else [child])]
        for block in blocks:
            block.register_forward_pre_hook(arrive)
            block.register_forward_hook(leave)

    @contextlib.contextmanager
    def using(self, model, part: str):
        """Puts one part ("text", "unet", "vae") on the device for the duration, under medvram/lowvram."""
        policy = self.policy
        if policy.offload == "none" or (policy.offload == "lowvram" and part == "unet"):
            yield
            return
        module = getattr(model, PARTS[part])
        module.to(policy.device)
        try:
            yield
        finally:
            module.to("cpu")
            torch.cuda.empty_cache()
