"""Command-line flags (fixed for the life of the process) and settings (changed in the UI, saved as JSON)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from modules.app.errors import RequestError
from modules.app.fileio import atomic_write_json

ROOT = Path(__file__).resolve().parents[2]


# torch.compile's modes that --compile takes: reduce-overhead adds CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead")


@dataclass(frozen=True)
class Flags:
    host: str = "127.0.0.1"
    port: int = 7860
    data_dir: Path = ROOT
    ckpt: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (see modules/models/memory.py's PRECISION_RULES)
    no_half: bool = False
    no_half_vae: bool = False
    medvram: bool = False
    lowvram: bool = False
    compile: str | None = None  # torch.compile's mode for the UNet (COMPILE_MODES); None: not compiled
    api: bool = True
    api_server_stop: bool = False  # POST /sdapi/v1/server-stop, -restart and -kill may end the server
    threads: int | None = None
    allowed_paths: tuple[Path, ...] = ()  # folders besides data_dir that requests may name (--allowed-path)
    queue_size: int | None = None  # how many jobs may wait; None: no bound
    # Scale-out (modules/scaleout/): N generation replicas on a local Ray instance, or those of a cluster.
    workers: int | None = None
    ray_address: str | None = None
    # Sign-in, as given; modules/service/auth.py reads them.
    gradio_auth: tuple[str, ...] = ()  # "user:pass,user:pass"
    gradio_auth_path: tuple[Path, ...] = ()  # files of user:pass lines
    api_auth: tuple[str, ...] = ()


def parse_flags(argv: list[str] | None = None) -> Flags:
    p = argparse.ArgumentParser(prog="launch.py", description="Stable Diffusion web UI")
    p.add_argument("--listen", action="store_true", help="listen on 0.0.0.0 instead of 127.0.0.1")
    p.add_argument("--port", type=int, default=Flags.port)
    p.add_argument("--data-dir", type=Path, default=ROOT, help="where models/, embeddings/, outputs/ and settings live")
    p.add_argument("--ckpt", help="checkpoint to select at start (file name in models/Stable-diffusion)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="the weights' precision; auto: fp16 on a GPU, bf16 on a CPU that computes it fast, else fp32")
    p.add_argument("--no-half", action="store_true", help="float32 everywhere, whatever --precision says")
    p.add_argument("--no-half-vae", action="store_true", help="keep the VAE in float32")
    p.add_argument("--medvram", action="store_true",
                   help="keep only the part in use, and the next one while it loads, on the GPU")
    p.add_argument("--lowvram", action="store_true", help="move the UNet to the GPU block by block")
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                   help="compile the UNet with torch.compile for faster steps; the first picture of each new size "
                        "(and batch size) is slow while it compiles, later ones of that size reuse the compiled code. "
                        "MODE: default, or reduce-overhead (also replays each step as a CUDA graph; not with --medvram)")
    p.add_argument("--nowebui-api-off", dest="api", action="store_false", help="do not serve /sdapi/v1")
    p.add_argument("--api-server-stop", action="store_true", help="let /sdapi/v1/server-stop, -restart and -kill end the server")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--queue-size", type=int, metavar="N",
                   help="at most N jobs wait for the model; further requests are refused (HTTP 429)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="generate on N Ray Serve replicas (one GPU each where there are GPUs) on a local Ray instance")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="generate on the replicas of an existing Ray cluster (as `ray start --head` prints it)")
    p.add_argument("--allowed-path", action="append", type=Path, default=[], metavar="DIR",
                   help="a folder besides the data folder that batch, extras and training requests may read and write; repeatable")
    p.add_argument("--gradio-auth", action="append", default=[], metavar="USER:PASS[,USER:PASS...]",
                   help="sign-in for the web UI")
    p.add_argument("--gradio-auth-path", action="append", type=Path, default=[], metavar="FILE",
                   help="a file of user:pass lines for the web UI's sign-in, added to --gradio-auth's")
    p.add_argument("--api-auth", action="append", default=[], metavar="USER:PASS[,USER:PASS...]",
                   help="HTTP Basic sign-in for /sdapi/v1")
    a = p.parse_args(argv)
    if a.workers is not None and a.workers < 1:
        p.error(f"--workers must be at least 1, got {a.workers}")
    allowed = []
    for folder in a.allowed_path:
        if not folder.expanduser().is_dir():
            p.error(f"--allowed-path {folder}: no such folder")
        allowed.append(folder.expanduser().resolve())
    return Flags(
        host="0.0.0.0" if a.listen else "127.0.0.1",
        port=a.port,
        data_dir=a.data_dir.resolve(),
        ckpt=a.ckpt,
        device=a.device,
        precision=a.precision,
        no_half=a.no_half,
        no_half_vae=a.no_half_vae,
        medvram=a.medvram,
        lowvram=a.lowvram,
        compile=a.compile,
        api=a.api,
        api_server_stop=a.api_server_stop,
        threads=a.threads,
        allowed_paths=tuple(allowed),
        queue_size=a.queue_size,
        workers=a.workers,
        ray_address=a.ray_address,
        gradio_auth=tuple(a.gradio_auth),
        gradio_auth_path=tuple(a.gradio_auth_path),
        api_auth=tuple(a.api_auth),
    )


@dataclass(frozen=True)
class Paths:
    root: Path
    allowed: tuple[Path, ...] = ()  # further folders a request may name (--allowed-path)

    @property
    def allowed_roots(self) -> list[Path]:
        """The folders a request may name, and anything under them: the data folder first."""
        return list(dict.fromkeys(Path(p).expanduser().resolve() for p in (self.root, *self.allowed)))

    def server_folder(self, text: str | Path, what: str) -> Path:
        """The folder on this computer that a request names (batch input and output, a training
        dataset), resolved, symlinks and '..' included, so that it cannot step out of the
        allowed roots; a relative one is taken from the data folder. RequestError, naming the
        allowed roots, if it lies outside them. Whether it exists is for the caller to say."""
        given = str(text).strip()
        try:
            folder = (Path(self.root) / Path(given).expanduser()).resolve()
        except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop
            raise RequestError(f"{what} {given!r} is not a usable path ({e})") from None
        roots = self.allowed_roots
        if not any(folder.is_relative_to(root) for root in roots):
            raise RequestError(
                f"{what} {given!r} is outside the folders this server lets requests use: "
                f"{', '.join(map(str, roots))}. Use a folder under one of them, or start the server with --allowed-path"
            )
        return folder

    @property
    def checkpoints(self) -> Path:
        return self.root / "models" / "Stable-diffusion"

    @property
    def shipped_checkpoints(self) -> Path:
        """The checkpoints that come with the code (the built-in model), whatever the data folder."""
        return ROOT / "models" / "Stable-diffusion"

    @property
    def vae(self) -> Path:
        return self.root / "models" / "VAE"

    @property
    def lora(self) -> Path:
        return self.root / "models" / "Lora"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def esrgan(self) -> Path:
        return self.root / "models" / "ESRGAN"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def styles_file(self) -> Path:
        return self.root / "styles.csv"

    @property
    def textual_inversion(self) -> Path:
        """Where embedding training writes its step copies and preview images."""
        return self.root / "textual_inversion"

    @property
    def ti_templates(self) -> list[Path]:
        """Prompt template folders: the user's, then the ones this project ships."""
        return list(dict.fromkeys([self.root / "textual_inversion_templates", ROOT / "textual_inversion_templates"]))

    @property
    def settings_file(self) -> Path:
        return self.root / "config.json"

    @property
    def extensions(self) -> Path:
        """Users' extensions, a folder each (modules/extensions/)."""
        return self.root / "extensions"

    @property
    def extensions_file(self) -> Path:
        """Which extensions are turned off."""
        return self.root / "extensions.json"

    @property
    def preferences_file(self) -> Path:
        return self.root / "user-choices.json"

    @property
    def hash_cache(self) -> Path:
        return self.root / "cache" / "hashes.json"


@dataclass(frozen=True)
class Settings:
    """User preferences shown on the Settings tab."""

    sd_model_checkpoint: str | None = None
    sd_vae: str = "Automatic"
    live_preview_every: int = 5  # steps; 0 turns previews off
    save_images: bool = True
    noise_source: str = "CPU"
    filename_prompt_max: int = 64
    upscaler_tile: int = 192  # pixels per side of the tiles an upscaler network runs on; 0: whole image
    upscaler_tile_overlap: int = 8

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)


def load_settings(path: Path) -> Settings:
    """Unknown keys are ignored and bad values fall back to defaults, so an old or hand-edited file never blocks start-up."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Settings()
    if not isinstance(raw, dict):
        return Settings()
    defaults = Settings()
    values = {}
    for f in dataclasses.fields(Settings):
        if f.name in raw:
            value, default = raw[f.name], getattr(defaults, f.name)
            if default is None or isinstance(value, type(default)):
                values[f.name] = value
    return Settings(**values)


def save_settings(settings: Settings, path: Path) -> None:
    atomic_write_json(path, dataclasses.asdict(settings))
