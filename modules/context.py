"""AppContext: everything a request needs, built once at start and passed in (never imported as a global)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modules.app.config import Flags, Paths, Settings, load_settings, save_settings
from modules.models.memory import DevicePolicy, ModelManager
from modules.networks.embeddings import EmbeddingDatabase
from modules.networks.lora import LoraLibrary
from modules.postprocess.upscalers import Tiling, Upscalers
from modules.prompting.styles import StyleLibrary
from modules.service.hooks import Hooks
from modules.service.jobs import JobQueue
from modules.service.preferences import Preferences


@dataclass
class AppContext:
    flags: Flags
    paths: Paths
    settings: Settings
    models: ModelManager
    embeddings: EmbeddingDatabase
    loras: LoraLibrary
    styles: StyleLibrary
    upscalers: Upscalers
    jobs: JobQueue = field(default_factory=JobQueue)
    preferences: Preferences = field(default_factory=Preferences)
    # A scale-out backend's stand-in for pipeline.generate, which runs the job elsewhere; None:
    # generation runs in this process (pipeline.generator chooses).
    generator: Callable[..., Any] | None = None
    hooks: Hooks = field(default_factory=Hooks)  # the extensions' functions at every job's hook points

    @classmethod
    def create(cls, flags: Flags, generator: Callable[..., Any] | None = None) -> "AppContext":
        """`generator`: a scale-out backend, whose `replicas` jobs run at once."""
        paths = Paths(flags.data_dir, flags.allowed_paths)
        for folder in (paths.checkpoints, paths.vae, paths.lora, paths.esrgan, paths.embeddings, paths.outputs):
            folder.mkdir(parents=True, exist_ok=True)
        settings = load_settings(paths.settings_file)
        models = ModelManager(paths, DevicePolicy.from_flags(flags), default=flags.ckpt or settings.sd_model_checkpoint)
        upscalers = Upscalers(paths.models, models.policy.device, models.policy.upscaler_dtype)
        return cls(
            flags=flags, paths=paths, settings=settings, models=models,
            embeddings=EmbeddingDatabase(paths.embeddings, paths.hash_cache),
            loras=LoraLibrary(paths.lora, paths.hash_cache),
            styles=StyleLibrary(paths.styles_file),
            upscalers=upscalers,
            jobs=JobQueue(max_waiting=flags.queue_size, workers=getattr(generator, "replicas", 1)),
            generator=generator,
            preferences=Preferences(paths.preferences_file),
        )

    @property
    def tiling(self) -> Tiling:
        return Tiling(self.settings.upscaler_tile, self.settings.upscaler_tile_overlap)

    def update_settings(self, **changes) -> Settings:
        self.settings = self.settings.replace(**changes)
        save_settings(self.settings, self.paths.settings_file)
        return self.settings
