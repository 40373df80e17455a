"""ModelManager: which checkpoint is loaded, on which device, in which precision, and what is offloaded.

Offload modes move weights with forward hooks registered on the model's own submodules (PyTorch's
public hook API), so the model code knows nothing about where its weights live. A WeightMover does
the moving: on a CUDA device each offloaded tensor has a page-locked home in CPU memory, uploads run
on a side stream so that the next part (medvram) or UNet block (lowvram) loads while the current
one computes, and eviction copies nothing back, since weights do not change while on the device.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

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
    compile: str | None = None  # torch.compile's mode for the UNet (--compile); None: not compiled

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
        if flags.compile and offload == "lowvram":
            # Its hooks move blocks between the devices in the middle of the UNet's forward, which
            # a compiled graph can neither contain nor skip.
            raise SystemExit("--compile does not go with --lowvram, which moves the UNet to the GPU block by block "
                             "during each step: leave one of them out (--medvram works with --compile)")
        if flags.compile == "reduce-overhead" and offload == "medvram":
            # A CUDA graph replays the weights' addresses it was recorded with; medvram gives the
            # UNet new ones at every job.
            raise SystemExit("--compile reduce-overhead does not go with --medvram, which puts the UNet at new "
                             "addresses in GPU memory at every job: use --compile (default mode) with --medvram")
        vae = " (VAE float32: --no-half-vae)" if flags.no_half_vae and dtype != torch.float32 else ""
        return cls(device, dtype, vae_dtype, offload, f"{str(dtype).removeprefix('torch.')} on {device}{vae}: {why}",
                   compile=flags.compile)

    @property
    def channels_last(self) -> bool:
        """Convolution weights in channels-last order: oneDNN's bfloat16 convolutions on a CPU run
        faster so (bench/cpu_speed.py measures it on the VAE decode). Not on a GPU: PyTorch's CUDA
        group norm gives its output in the plain layout, so each of the UNet's norms would turn
        the feature map around and the next convolution turn it back."""
        return self.device.type == "cpu" and self.dtype == torch.bfloat16

    @property
    def vae_fallback_dtype(self) -> torch.dtype:
        """What a float16 VAE that overflows decodes in from then on: bfloat16 under lowvram on a
        GPU that computes it, whose range is float32's in half the memory (SDXL's 1024 px decode
        needs about 3.3 GB in float32, 1.7 in 16 bits); float32 elsewhere, for its precision."""
        if self.offload == "lowvram" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32

    @property
    def upscaler_dtype(self) -> torch.dtype:
        """Upscaler networks run in half precision on a GPU only: not all of them are made for
        bfloat16, and on a CPU they are a small part of the time."""
        return self.dtype if self.device.type == "cuda" else torch.float32


def place(model, policy: DevicePolicy):
    """Puts a freshly loaded model in the policy's precision, and on its device unless offloading
    keeps it on the CPU (then in page-locked memory on a CUDA machine, with lowvram's hooks on the
    UNet's blocks); compiles the UNet under --compile. Files keep the dtype they were saved in
    (the built-in model is fp16), whatever the machine computes fast."""
    # The networks only: the noise schedule (alphas_cumprod) stays float32, since its values near
    # 1 round to 1 in bfloat16 and the lowest noise levels would become 0.
    model.model.to(dtype=policy.dtype)
    model.text_model.to(dtype=policy.dtype)
    model.first_stage_model.to(dtype=policy.vae_dtype)
    model.vae_fallback_dtype = policy.vae_fallback_dtype
    if policy.channels_last:
        model.model.to(memory_format=torch.channels_last)
        model.first_stage_model.to(memory_format=torch.channels_last)
    if policy.offload == "none":
        model.to(policy.device)
    elif policy.device.type == "cuda":
        for attribute in PARTS.values():
            pin_homes(getattr(model, attribute))
    if policy.offload == "lowvram":
        stream_blocks(model.model.diffusion_model, policy.device)
    if policy.compile:
        # In place, so that the state_dict keys stay the checkpoint's, and with the parameters as
        # graph inputs (torch's default), so that LoRA's and medvram's swapped weight tensors run
        # in the same graph. One graph per input size (dynamic=False), kept by torch for later
        # requests of that size. The default mode has no CUDA graphs; reduce-overhead replays each
        # UNet call as one, which saves launching its kernels one by one (the sampler reads each
        # call's output before the next call overwrites it), and records it again, without
        # compiling, when a LoRA swaps weights. max-autotune would time kernel variants for
        # minutes at each new size.
        model.model.diffusion_model.compile(dynamic=False, mode=None if policy.compile == "default" else policy.compile)
    return model


PARTS = {
    "text": "text_model",
    "unet": "model",
    "vae": "first_stage_model",
}
# The order the pipeline uses a model's parts in, one pass at a time: medvram uploads the next part
# while the current one works. Not vae -> text: a job may end with the decode, and medvram leaves
# nothing on the GPU between jobs.
NEXT_PART = {"text": "unet", "unet": "vae"}

PIN_SLAB_BYTES = 64 << 20  # page-locked memory is taken in slabs that tensors share (see pin_homes)
PIN_ALIGN = 256
# Lowvram moves the UNet's top-level blocks one at a time, and the children of a block larger than
# this: SDXL's 1280-channel blocks hold 10 transformer layers (about 0.7 GB in fp16), its layers
# about 70 MB each.
LOWVRAM_UNIT_BYTES = 128 << 20


def _tensor_slots(module: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor, bool]]:
    """(owning module, name, tensor, is a parameter) for every parameter and buffer of `module`,
    a parameter shared by several modules once."""
    seen = set()
    for owner in module.modules():
        for name, param in owner.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield owner, name, param, True
        for name, buffer in owner.named_buffers(recurse=False):
            yield owner, name, buffer, False


def _point(owner: nn.Module, name: str, is_param: bool, value: torch.Tensor) -> None:
    """Makes owner.name hold `value`: a parameter keeps its object (LoRA, compiled graphs and
    hooks know it by that), a buffer is replaced as Module.to replaces it."""
    if is_param:
        getattr(owner, name).data = value
    else:
        setattr(owner, name, value)


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, _, t, _ in _tensor_slots(module))


def pin_homes(module: nn.Module) -> None:
    """Moves `module`'s CPU tensors into page-locked memory, which the GPU copies from without
    the driver's staging copy and without holding up the CPU. Slabs of PIN_SLAB_BYTES are shared
    by many tensors, since torch's pinned allocator rounds each allocation up to a power of two.
    Where the system refuses to lock more memory, the rest stays pageable: slower copies, same
    results."""
    slab, free = None, 0
    try:
        for owner, name, tensor, is_param in _tensor_slots(module):
            if tensor.device.type != "cpu" or tensor.is_pinned():
                continue
            size = tensor.numel() * tensor.element_size()
            stride = torch.empty_like(tensor, device="meta").stride()  # channels-last weights stay so
            if size > PIN_SLAB_BYTES:
                home = torch.empty_strided(tensor.shape, stride, dtype=tensor.dtype, pin_memory=True)
            else:
                if slab is None or size > free:
                    slab, free = torch.empty(PIN_SLAB_BYTES, dtype=torch.uint8, pin_memory=True), PIN_SLAB_BYTES
                start = PIN_SLAB_BYTES - free
                home = slab[start:start + size].view(tensor.dtype).as_strided(tensor.shape, stride)
                free = max(free - -(-size // PIN_ALIGN) * PIN_ALIGN, 0)
            home.copy_(tensor)
            _point(owner, name, is_param, home)
    except RuntimeError as e:
        log.warning("Could not page-lock more memory for offloaded weights (%s); the rest are copied to the GPU "
                    "from ordinary memory, which is slower.", e)


@dataclass
class _Slot:
    owner: nn.Module
    name: str
    is_param: bool
    home: torch.Tensor  # on the CPU
    copy: torch.Tensor  # on the device

    def current(self) -> torch.Tensor:
        return getattr(self.owner, self.name)


@dataclass
class _Upload:
    slots: list[_Slot]
    done: torch.cuda.Event | None  # recorded after the copies; None where they were synchronous


class WeightMover:
    """Moves modules' weights to the device and back for the offload modes. upload() starts the
    copy, ready() makes the compute stream wait for it (uploading first if needed), evict() points
    the module back at its CPU tensors. Keyed by module, weakly: an unloaded model is not kept.

    On a CUDA device the copies run on a side stream. Their memory is taken on the compute
    stream, as every tensor's is, so that it returns there when evicted; the side stream starts
    after the work queued so far on the compute stream, which may still be reading that memory
    from an earlier owner, and the work queued after it (the current part or block) runs beside
    the copy. On other devices (the CPU standing in for a GPU in tests) copies are synchronous."""

    def __init__(self, device: torch.device):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # tensors say "cuda:0", never "cuda"
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._uploads: weakref.WeakKeyDictionary[nn.Module, _Upload] = weakref.WeakKeyDictionary()

    @property
    def resident(self) -> list[nn.Module]:
        """The modules uploaded and not evicted."""
        return list(self._uploads)

    def upload(self, module: nn.Module) -> None:
        if module in self._uploads:
            return
        slots = [_Slot(owner, name, is_param, tensor.data, torch.empty_like(tensor.data, device=self.device))
                 for owner, name, tensor, is_param in _tensor_slots(module) if tensor.device != self.device]
        done = None
        if self._stream is not None and slots:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                for slot in slots:
                    slot.copy.copy_(slot.home, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        else:
            for slot in slots:
                slot.copy.copy_(slot.home)
        for slot in slots:
            _point(slot.owner, slot.name, slot.is_param, slot.copy)
        self._uploads[module] = _Upload(slots, done)

    def ready(self, module: nn.Module) -> None:
        self.upload(module)
        self._wait(self._uploads[module])

    def evict(self, module: nn.Module) -> None:
        upload = self._uploads.pop(module, None)
        if upload is None:
            return
        # Also for an upload never used: its memory must not be handed out while the copy writes it.
        self._wait(upload)
        for slot in upload.slots:
            now = slot.current()
            if now.device != self.device:  # put elsewhere meanwhile: left where it is
                continue
            if now.data_ptr() == slot.copy.data_ptr() and now.dtype == slot.copy.dtype and now.shape == slot.copy.shape:
                home = slot.home
            else:  # replaced on the device (the VAE put in float32 after a NaN): its new values come back
                home = torch.empty_like(now, device="cpu", pin_memory=self._stream is not None).copy_(now)
            _point(slot.owner, slot.name, slot.is_param, home)

    def evict_all(self, keep=()) -> None:
        for module in self.resident:
            if module not in keep:
                self.evict(module)

    def _wait(self, upload: _Upload) -> None:
        if upload.done is not None:
            torch.cuda.current_stream(self.device).wait_event(upload.done)


def prefetch(mover: WeightMover, module: nn.Module) -> None:
    """Starts `module`'s upload beside the current work, unless the device has no room for it
    now: then it uploads when it is needed, after what is there has left."""
    with contextlib.suppress(torch.OutOfMemoryError):
        mover.upload(module)


def stream_units(unet: nn.Module) -> list[nn.Module]:
    """The modules lowvram moves to the device one at a time, in the order the UNet holds them:
    its top-level blocks, and in place of a block over LOWVRAM_UNIT_BYTES that has no weights of
    its own, its children (whose forwards its own calls, as all blocks of ours do). Lists are
    always opened, having no forward of their own."""
    def units(module: nn.Module) -> list[nn.Module]:
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        children = list(module.children())
        if isinstance(module, nn.ModuleList) or (children and not own and _bytes(module) > LOWVRAM_UNIT_BYTES):
            return [unit for child in children for unit in units(child)]
        return [module]

    return [unit for child in unet.children() for unit in units(child)]


def stream_blocks(unet: nn.Module, device: torch.device) -> list[nn.Module]:
    """Lowvram: each unit of the UNet (stream_units) visits the device only for its own forward,
    while the unit that ran after it last time is uploaded beside it (the order is learnt in the
    first forward, which uploads each unit as it comes). After the UNet's forward, also one that
    raised, nothing of it is left on the device. Returns the units."""
    mover = WeightMover(device)
    successor: dict[nn.Module, nn.Module] = {}
    previous: list[nn.Module | None] = [None]

    # The hooks return None: a hook's return value would replace the module's input or output.
    def start(unet, args) -> None:
        previous[0] = None

    def arrive(unit, args) -> None:
        if previous[0] is not None:
            successor[previous[0]] = unit
        previous[0] = unit
        mover.ready(unit)
        if unit in successor:
            prefetch(mover, successor[unit])

    def leave(unit, args, output) -> None:
        mover.evict(unit)

    def finish(unet, args, output) -> None:
        mover.evict_all()

    found = stream_units(unet)
    for unit in found:
        unit.register_forward_pre_hook(arrive)
        unit.register_forward_hook(leave, always_call=True)
    unet.register_forward_pre_hook(start)
    unet.register_forward_hook(finish, always_call=True)
    return found


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
        # Offload modes: the parts on the device, and the (model, part) pairs inside `using`, outermost first.
        self._mover = WeightMover(policy.device) if policy.offload != "none" else None
        self._in_use: list[tuple[object, str]] = []

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
        known = (", ".join(c.title for c in self.checkpoints())
                 or "none: put .safetensors or .ckpt files in models/Stable-diffusion")
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
                    place(model, self.policy)
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

    def release(self) -> None:
        """Under medvram and lowvram, takes every part off the device: for the end of a job that
        does not end with the decode (training), after which `using` keeps the next part there."""
        if self._mover is not None:
            self._leave(set())

    def _wanted(self, model, part: str) -> set[nn.Module]:
        """The part's module and, under medvram, the module of the part that follows it."""
        wanted = {getattr(model, PARTS[part])}
        if self.policy.offload == "medvram" and part in NEXT_PART:
            wanted.add(getattr(model, PARTS[NEXT_PART[part]]))
        return wanted

    @contextlib.contextmanager
    def using(self, model, part: str):
        """Puts one part ("text", "unet", "vae") on the device for the duration, under medvram and
        lowvram (whose UNet moves block by block instead). Medvram also uploads the part that
        follows (text -> unet -> vae) beside this one's work, and keeps it when this one leaves;
        a part used inside another (the live preview's decode during sampling) keeps the outer
        one. Other parts leave the device when a part comes in; after the decode nothing stays,
        after an error only the parts still in use. The weights reach the device unchanged, so
        the results are the default mode's, bit for bit. Called from the queue's one worker
        thread."""
        mover = self._mover
        if mover is None or (self.policy.offload == "lowvram" and part == "unet"):
            yield
            return
        module = getattr(model, PARTS[part])
        mover.evict_all(self._held() | self._wanted(model, part))
        mover.ready(module)
        for following in self._wanted(model, part) - {module}:
            prefetch(mover, following)
        self._in_use.append((model, part))
        try:
            yield
        except BaseException:
            self._in_use.pop()
            self._leave({getattr(m, PARTS[p]) for m, p in self._in_use})
            raise
        self._in_use.pop()
        self._leave(self._held() | (self._wanted(model, part) - {module}))

    def _held(self) -> set[nn.Module]:
        """What the parts in use keep on the device: each one and, under medvram, the next."""
        return set().union(*(self._wanted(m, p) for m, p in self._in_use))

    def _leave(self, kept: set[nn.Module]) -> None:
        self._mover.evict_all(kept)
        if not self._mover.resident and self.policy.device.type == "cuda":
            torch.cuda.empty_cache()  # between jobs the GPU's memory is free for other programs
