"""A1111's /sdapi/v1 routes about the server itself: its flags, the model files it lists, memory,
loading and unloading the checkpoint, and stopping the server; with A1111's field names. The
features this server does not have (hypernetworks, interrogation without a captioning model)
answer 4xx saying so."""

from __future__ import annotations

import dataclasses
import gc
import os
from pathlib import Path

import torch
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from modules.api.auth import caller, signed_in
from modules.api.images import decode_image
from modules.app.config import Flags
from modules.service.jobs import Job

try:
    import psutil  # installed with accelerate, which k-diffusion needs
except ImportError:
    psutil = None

# A1111's face restorers and the models/ folder each reads its model file from.
FACE_RESTORERS = (("CodeFormer", "Codeformer"), ("GFPGAN", "GFPGAN"))
FACE_RESTORER_SUFFIXES = (".pth", ".safetensors")
# A1111's interrogation models (the body's `model`) and the models/ folder each needs a file in.
INTERROGATORS = {"clip": "BLIP", "deepdanbooru": "torch_deepdanbooru"}
INTERROGATOR_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")
HYPERNETWORKS = ("hypernetworks are not supported by this server; a LoRA (models/Lora, <lora:name:weight>) "
                 "or a textual-inversion embedding (/sdapi/v1/create/embedding) does the same job")
# What cmd-flags shows for a sign-in flag that is set: anyone who may call the API may read the answer.
HIDDEN = "(set; hidden)"


class SDVaeItem(BaseModel):
    model_name: str
    filename: str


class HypernetworkItem(BaseModel):
    name: str
    path: str | None


class FaceRestorerItem(BaseModel):
    name: str
    cmd_dir: str | None


class RealesrganItem(BaseModel):
    name: str
    path: str | None
    scale: int | None


class MemoryResponse(BaseModel):
    ram: dict
    cuda: dict


class InterrogateBody(BaseModel):
    image: str = ""
    model: str = "clip"


def _plain(value):
    """A flag's value as JSON has it."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def a1111_flags(flags: Flags) -> dict:
    """Our flags as A1111's /cmd-flags names them (its argparse destinations) where it has the
    flag, under our own names where it has none. Passwords never leave the server."""
    shown = {
        "listen": flags.host == "0.0.0.0",
        # A1111 picks the GPU when there is one, as our "auto" and "cuda" do; --use-cpu all is our cpu.
        "use_cpu": ["all"] if flags.device == "cpu" else [],
        "device_id": flags.device.partition(":")[2] or None,
        "allowed_path": [str(p) for p in flags.allowed_paths],
        "gradio_auth": HIDDEN if flags.gradio_auth else None,
        "gradio_auth_path": ",".join(map(str, flags.gradio_auth_path)) or None,  # A1111 takes one file
        "api_auth": HIDDEN if flags.api_auth else None,
    }
    renamed = {"host", "device", "allowed_paths", "gradio_auth", "gradio_auth_path", "api_auth"}
    own = {f.name: _plain(getattr(flags, f.name)) for f in dataclasses.fields(flags) if f.name not in renamed}
    return {**own, **shown}


def ram() -> dict:
    if psutil is None:
        return {"error": "psutil is not installed"}
    memory = psutil.virtual_memory()
    return {"free": memory.available, "used": memory.total - memory.available, "total": memory.total}


def cuda_memory(device: torch.device) -> dict:
    """A1111's CUDA figures, in bytes, for our device (the first GPU when we run on the CPU)."""
    if not torch.cuda.is_available():
        return {"error": "unavailable"}
    device = device if device.type == "cuda" else torch.device("cuda")
    try:
        free, total = torch.cuda.mem_get_info(device)
        stats = torch.cuda.memory_stats(device)  # empty until something is allocated
    except RuntimeError as e:
        return {"error": str(e)}

    def now_and_peak(name: str) -> dict:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": now_and_peak("active_bytes"),
        "allocated": now_and_peak("allocated_bytes"),
        "reserved": now_and_peak("reserved_bytes"),
        "inactive": now_and_peak("inactive_split_bytes"),
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())


def create_router(ctx) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1")

    @router.get("/cmd-flags")
    def cmd_flags():
        return a1111_flags(ctx.flags)

    @router.get("/sd-vae", response_model=list[SDVaeItem])
    def sd_vae():
        """The files the sd_vae option may name (besides Automatic and None)."""
        return [SDVaeItem(model_name=p.name, filename=str(p)) for p in ctx.models.vaes()]

    @router.get("/sd-modules", response_model=list[SDVaeItem])
    def sd_modules():
        return sd_vae()

    # The VAE and LoRA folders are listed afresh at every request, so there is nothing to re-read;
    # embeddings are read now, so that a broken file is reported at once. A1111 answers null.
    @router.post("/refresh-vae")
    def refresh_vae():
        return None

    @router.post("/refresh-loras")
    def refresh_loras():
        return None

    @router.post("/refresh-embeddings")
    def refresh_embeddings():
        ctx.embeddings.refresh()
        return None

    @router.get("/hypernetworks", response_model=list[HypernetworkItem])
    def hypernetworks():
        return []

    @router.post("/create/hypernetwork")
    def create_hypernetwork():
        raise HTTPException(422, HYPERNETWORKS)

    @router.post("/train/hypernetwork")
    def train_hypernetwork():
        raise HTTPException(422, HYPERNETWORKS)

    @router.get("/face-restorers", response_model=list[FaceRestorerItem])
    def face_restorers():
        """A1111's restorers whose model file is in their folder."""
        folders = [(name, ctx.paths.models / folder) for name, folder in FACE_RESTORERS]
        return [FaceRestorerItem(name=name, cmd_dir=str(folder)) for name, folder in folders
                if _files(folder, FACE_RESTORER_SUFFIXES)]

    @router.get("/realesrgan-models", response_model=list[RealesrganItem])
    def realesrgan_models():
        """The upscaler networks from models/RealESRGAN, and Real-ESRGAN files put among the others."""
        return [RealesrganItem(name=u.name, path=str(u.path), scale=int(u.scale))
                for u in ctx.upscalers.networks() if u.folder == "RealESRGAN" or "realesrgan" in u.name.lower()]

    @router.get("/memory", response_model=MemoryResponse)
    def memory():
        return MemoryResponse(ram=ram(), cuda=cuda_memory(ctx.models.policy.device))

    @router.post("/unload-checkpoint")
    def unload_checkpoint(http: Request):
        """Drops the loaded checkpoints; queued, so that no running job loses its model. The next
        job that needs one loads it."""
        def unload(job):
            ctx.models.unload()
            gc.collect()
            torch.cuda.empty_cache()  # gives the freed memory back to the device; nothing without CUDA

        ctx.jobs.run(Job(description="unload checkpoint (api)", owner=caller(http)), unload)
        return {}

    @router.post("/reload-checkpoint")
    def reload_checkpoint(http: Request):
        """Loads the caller's own checkpoint (else the server's default), as a job of theirs."""
        chosen = ctx.preferences.of(signed_in(http)).get("sd_model_checkpoint")
        try:
            ctx.jobs.run(Job(description="reload checkpoint (api)", owner=caller(http)),
                         lambda job: ctx.models.get(chosen, ctx.settings.sd_vae))
        except LookupError as e:
            raise HTTPException(404, str(e))
        except ValueError as e:  # a file that cannot be loaded
            raise HTTPException(422, str(e))
        return {}

    @router.post("/interrogate")
    def interrogate(body: InterrogateBody):
        if not body.image:
            raise HTTPException(404, "Image not found: send the picture as base64 in `image`")  # A1111's answer
        decode_image(body.image)
        if body.model not in INTERROGATORS:
            raise HTTPException(404, f"interrogate model {body.model!r} not found; A1111's are {', '.join(INTERROGATORS)}")
        folder = ctx.paths.models / INTERROGATORS[body.model]
        found = _files(folder, INTERROGATOR_SUFFIXES)
        if not found:
            raise HTTPException(404, f"interrogate model {body.model!r} needs its model file in {folder}, as in A1111; "
                                     "this server ships none")
        raise HTTPException(422, f"interrogation is not implemented by this server: {found[0].name} in {folder} is not read")

    def server_control(what: str) -> None:
        if not ctx.flags.api_server_stop:
            raise HTTPException(404, f"/sdapi/v1/{what} is off: start the server with --api-server-stop to allow it")

    control = dict(include_in_schema=ctx.flags.api_server_stop)

    @router.post("/server-stop", **control)
    def server_stop(http: Request):
        """Asks uvicorn to finish the requests under way and stop; webui.py puts its server in app.state."""
        server_control("server-stop")
        server = getattr(http.app.state, "server", None)
        if server is None:
            raise HTTPException(409, "this server was not started by webui.py, so it cannot stop itself; "
                                     "stop it where it was started")
        server.should_exit = True
        return PlainTextResponse("Stopping.")

    @router.post("/server-restart", **control)
    def server_restart():
        server_control("server-restart")
        raise HTTPException(409, "this server cannot start itself again; stop it with /sdapi/v1/server-stop "
                                 "and start it again (python3 launch.py)")

    @router.post("/server-kill", **control)
    def server_kill():
        """Ends the process at once, running jobs and all, as A1111 does; after this answer is sent."""
        server_control("server-kill")
        return PlainTextResponse("Killing.", background=BackgroundTask(os._exit, 0))

    return router
