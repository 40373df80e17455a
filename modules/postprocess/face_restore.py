"""Face restoration: GFPGAN and CodeFormer, as A1111's Extras tab and API apply them.

    GFPGAN, CODEFORMER              one record per network kind: its folder, spandrel's name for it, how it is called
    FaceRestorers(models_root, device).restore(image, restorer, weight)   every face found, restored

A picture is restored as A1111 does it, with the same facexlib helper and the same settings: its
faces are found by RetinaFace (on a copy whose shorter side is 640 px), each is turned upright by
its five landmarks into a 512x512 crop, the network restores the crop, and the crop is pasted
back through a soft mask that ParseNet draws around the face. A picture without faces comes back
as it was.

Nothing is downloaded: every file comes from the data folder's models/, where A1111 keeps it.

    models/GFPGAN/      a GFPGAN network whose name holds "GFPGAN" (GFPGANv1.4.pth), and facexlib's
                        detection_Resnet50_Final.pth and parsing_parsenet.pth, which both restorers use
    models/Codeformer/  a CodeFormer network (codeformer-v0.1.0.pth)

spandrel reads the networks (CodeFormer through spandrel-extra-arches) as it reads upscalers:
`.safetensors` directly, pickles through torch's weights-only unpickler, so a file runs no code.
facexlib reads its two files with torch.load, whose default is weights-only as well; it would
download a file that is missing, so each is looked for first and its absence refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modules.postprocess.upscalers import NETWORK_SUFFIXES, load_descriptor, to_bytes

FACE_SIZE = 512  # the crop every GFPGAN and CodeFormer file is trained on
HELPER_FOLDER = "GFPGAN"  # A1111 points facexlib at models/GFPGAN for both restorers
DETECTOR_FILE = "detection_Resnet50_Final.pth"
PARSER_FILE = "parsing_parsenet.pth"
HELPER_FILES = (DETECTOR_FILE, PARSER_FILE)


class FaceRestoreError(ValueError):
    """A file a face restorer needs is missing or unusable; the message names it and its folder."""


@dataclass(frozen=True)
class Restorer:
    name: str  # as A1111 writes it in the UI and the parameters text
    folder: str  # under models/, A1111's folder name
    architecture: str  # spandrel's id
    example: str  # the file A1111 users have
    # Restores a normalised crop (1, 3, 512, 512) in [-1, 1]; the float is CodeFormer's weight.
    call: Callable[[torch.nn.Module, torch.Tensor, float], torch.Tensor]
    name_part: str = ""  # only files whose name holds this (any case) are this restorer's


GFPGAN = Restorer(
    "GFPGAN", "GFPGAN", "GFPGAN", "GFPGANv1.4.pth",
    # The StyleGAN decoder adds the noise stored in the file rather than fresh noise, so a picture
    # restores the same way every time.
    lambda model, x, weight: model(x, return_rgb=False, randomize_noise=False)[0],
    # models/GFPGAN also holds facexlib's files, which A1111 tells apart by this.
    name_part="gfpgan",
)
CODEFORMER = Restorer(
    "CodeFormer", "Codeformer", "CodeFormer", "codeformer-v0.1.0.pth",
    lambda model, x, weight: model(x, weight=weight, adain=True)[0],
)


def read_network(restorer: Restorer, path: Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The network in `path`, in eval mode on `device`; FaceRestoreError if the file cannot be read
    or holds another architecture."""
    import spandrel  # here, not at the top: it loads every architecture it knows (over a second at start-up)
    from spandrel_extra_arches import EXTRA_REGISTRY  # here for the same reason; CodeFormer is one of these

    path = Path(path)
    registry = spandrel.MAIN_REGISTRY.copy()  # a copy: spandrel's own registry stays as it is
    registry.add(*EXTRA_REGISTRY, ignore_duplicates=True)
    try:
        descriptor = load_descriptor(path, device, registry)
    except ValueError as e:
        raise FaceRestoreError(f"{e} (in {path.parent}; {restorer.name} needs its own network file)") from e
    if descriptor.architecture.id != restorer.architecture:
        raise FaceRestoreError(f"{path}: holds {descriptor.architecture.name}, not {restorer.name}; move it out of {path.parent}")
    # Float32 on every device: spandrel marks neither network as working in half precision.
    return descriptor.model.eval().to(device)


class FaceRestorers:
    """The face restorers of one data folder, for one run: each network, and the face helper,
    is read on first use and kept for the pictures that follow."""

    def __init__(self, models_root: Path, device: torch.device | str = "cpu"):
        self.models_root = Path(models_root)
        self.device = torch.device(device)
        self._networks: dict[str, torch.nn.Module] = {}
        self._helper = None

    def model_file(self, restorer: Restorer) -> Path:
        """The restorer's file, the first by name in its folder, as A1111 takes it."""
        folder = self.models_root / restorer.folder
        files = sorted(
            p for p in folder.rglob("*")
            if p.suffix.lower() in NETWORK_SUFFIXES and p.name not in HELPER_FILES and restorer.name_part in p.name.lower()
            and p.is_file()
        ) if folder.is_dir() else []
        if not files:
            named = f", with \"{restorer.name_part.upper()}\" in its name" if restorer.name_part else ""
            raise FaceRestoreError(
                f"{restorer.name} face restoration needs a {restorer.name} model file (such as {restorer.example}{named}) "
                f"in {folder}; there is none. Put one there, or leave {restorer.name} visibility at 0"
            )
        return files[0]

    def helper_files(self) -> list[Path]:
        """facexlib's detector and face parser; FaceRestoreError naming those that are missing."""
        folder = self.models_root / HELPER_FOLDER
        missing = [name for name in HELPER_FILES if not (folder / name).is_file()]
        if missing:
            raise FaceRestoreError(
                f"face restoration finds faces and pastes them back with facexlib's detector and face parser, "
                f"read from {folder}: put {' and '.join(missing)} there (the files A1111 keeps in the same folder)"
            )
        return [folder / name for name in HELPER_FILES]

    def check(self, restorer: Restorer) -> None:
        """FaceRestoreError, naming the file and the folder, if anything `restorer` needs is missing."""
        self.model_file(restorer)
        self.helper_files()

    def network(self, restorer: Restorer) -> torch.nn.Module:
        if restorer.name not in self._networks:
            self._networks[restorer.name] = read_network(restorer, self.model_file(restorer), self.device)
        return self._networks[restorer.name]

    def helper(self):
        """facexlib's FaceRestoreHelper with A1111's settings, its weights read from models/GFPGAN."""
        if self._helper is None:
            detector, _ = self.helper_files()  # facexlib would download a missing one
            # Here, not at the top: facexlib brings numba and OpenCV, wanted only when faces are restored.
            from facexlib.utils.face_restoration_helper import FaceRestoreHelper

            try:
                self._helper = FaceRestoreHelper(
                    upscale_factor=1, face_size=FACE_SIZE, crop_ratio=(1, 1), det_model="retinaface_resnet50", save_ext="png",
                    use_parse=True, device=self.device, model_rootpath=str(detector.parent),
                )
            except Exception as e:  # torch.load's and load_state_dict's errors, whatever the file holds
                raise FaceRestoreError(
                    f"{DETECTOR_FILE} or {PARSER_FILE} in {detector.parent} could not be read ({type(e).__name__}: {e})"
                ) from e
        return self._helper

    def detect(self, bgr: np.ndarray) -> list[np.ndarray]:
        """The five landmarks (eyes, nose, mouth corners; x, y) of each face in a BGR picture."""
        helper = self.helper()
        helper.clean_all()
        helper.read_image(bgr)
        helper.get_face_landmarks_5(only_center_face=False, resize=640, eye_dist_threshold=5)
        faces = list(helper.all_landmarks_5)
        helper.clean_all()
        return faces

    def restore(self, image: Image.Image, restorer: Restorer, weight: float = 0.5) -> Image.Image:
        """`image` (RGB) with every face restored by `restorer`; `weight` is CodeFormer's (0: the
        network's own face, 1: closest to the picture's)."""
        network = self.network(restorer)  # first, so that an unusable file is named whatever the picture shows
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        faces = self.detect(bgr)
        if not faces:
            return image
        helper = self.helper()
        try:
            helper.read_image(bgr)
            helper.all_landmarks_5 = faces
            helper.align_warp_face()
            with torch.inference_mode():
                for crop in helper.cropped_faces:
                    x = torch.from_numpy(np.ascontiguousarray(crop[:, :, ::-1])).permute(2, 0, 1).unsqueeze(0)
                    x = (x.to(self.device, torch.float32) / 255.0 - 0.5) / 0.5
                    out = to_bytes((restorer.call(network, x, weight) + 1) / 2)
                    helper.add_restored_face(np.ascontiguousarray(out[0].permute(1, 2, 0).cpu().numpy()[:, :, ::-1]))
            helper.get_inverse_affine(None)
            pasted = helper.paste_faces_to_input_image()
        finally:
            helper.clean_all()
        return Image.fromarray(np.ascontiguousarray(pasted[:, :, ::-1]))
