"""Pydantic shapes of the A1111-compatible /sdapi/v1 API (field names as A1111 clients send them)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from modules.app.fields import limits, text_problem
from modules.generation.request import GenerationRequest, Img2ImgRequest
from modules.postprocess.extras import ExtrasRequest


class RequestBody(BaseModel):
    """A JSON body whose fields are those of a request dataclass (`request_type`), made by
    `request_body`: the request's names (or A1111's, in `api_names`), types, defaults and limits,
    so that a field is declared once, on the request. Null in any field means its default, as
    A1111 clients send it; fields they send that we do not know are ignored, not refused."""

    model_config = ConfigDict(extra="ignore")

    request_type: ClassVar[type]
    api_names: ClassVar[dict[str, str]]  # request field -> body field, where A1111 names it otherwise

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def request_fields(self) -> dict[str, Any]:
        """The request's fields this body holds, by the request's names."""
        body_fields = type(self).model_fields
        names = ((f.name, self.api_names.get(f.name, f.name)) for f in dataclasses.fields(self.request_type))
        return {name: getattr(self, api) for name, api in names if api in body_fields}


def _json_type(annotation: Any) -> Any:
    """A tuple field travels as a JSON list."""
    if typing.get_origin(annotation) is tuple:
        return list[typing.get_args(annotation)[0]]
    return annotation


def request_body(name: str, request_type: type, *, base: type[RequestBody] = RequestBody, doc: str = "",
                 api_names: dict[str, str] | None = None, api_types: dict[str, Any] | None = None,
                 api_defaults: dict[str, Any] | None = None, leave_out: Iterable[str] = ()) -> type[RequestBody]:
    """The body class for `request_type`: a field for each of its fields but those in `leave_out`,
    named as in `api_names`, typed as in `api_types` (pictures travel as base64 text), with A1111's
    API default where `api_defaults` gives one, else the request's; limits go into the schema."""
    api_names, api_types, api_defaults = api_names or {}, api_types or {}, api_defaults or {}
    hints = typing.get_type_hints(request_type)
    definitions: dict[str, Any] = {}
    for f in dataclasses.fields(request_type):
        if f.name in leave_out:
            continue
        default, rule = api_defaults.get(f.name, f.default), limits(f)
        schema = rule.schema() if rule else None
        if default is dataclasses.MISSING:
            field = Field(json_schema_extra=schema)  # required
        else:
            field = Field(default=list(default) if isinstance(default, tuple) else default, json_schema_extra=schema)
        definitions[api_names.get(f.name, f.name)] = (api_types.get(f.name, _json_type(hints[f.name])), field)
    body = create_model(name, __base__=base, __doc__=doc or None, **definitions)
    body.request_type, body.api_names = request_type, api_names
    return body


class GenerationApiFields(RequestBody):
    """What /txt2img and /img2img take beside the request's own fields."""

    sampler_index: str | None = None  # older clients put the sampler name here
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True  # False: they become the caller's own choices
    send_images: bool = True
    save_images: bool = False
    script_name: str | None = None  # a selectable script's title (any case), with its arguments in order
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)  # title -> {"args": [...]}

    @model_validator(mode="after")
    def _writable_text(self):
        """The free-form fields are echoed back in the answer and scripts may write them into files."""
        for name in ("sampler_index", "override_settings", "script_name", "script_args", "alwayson_scripts"):
            problem = text_problem(name, getattr(self, name))
            if problem:
                raise ValueError(problem)
        return self


# A1111 names the batch count n_iter; the checkpoint, clip skip, the noise source and the mask
# weight come in override_settings (see routes.OVERRIDES), the outpainting fields from the
# outpainting script's arguments.
GENERATION_API_NAMES = {"batch_count": "n_iter"}
NOT_BODY_FIELDS = ("checkpoint", "clip_skip", "noise_source", "inpainting_mask_weight")
HIRES_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationRequest) if f.name.startswith("hr_")) + ("enable_hr",)

Txt2ImgBody = request_body("Txt2ImgBody", GenerationRequest, base=GenerationApiFields, api_names=GENERATION_API_NAMES,
                           leave_out=NOT_BODY_FIELDS, doc="A1111's /sdapi/v1/txt2img body.")


class Img2ImgApiFields(GenerationApiFields):
    """What /img2img takes beside the request's own fields."""

    mask_blur_x: int | None = None  # A1111's blur across and down; equal, or mask_blur is sent instead
    mask_blur_y: int | None = None
    include_init_images: bool = False


# A1111's API fills these with its processing class's defaults, which differ from its UI's (and ours).
IMG2IMG_API_DEFAULTS = {"inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0}

Img2ImgBody = request_body(
    "Img2ImgBody", Img2ImgRequest, base=Img2ImgApiFields, api_names=GENERATION_API_NAMES,
    api_types={"init_images": list[str], "mask": str | None, "inpaint_full_res": bool | int},
    api_defaults=IMG2IMG_API_DEFAULTS,
    leave_out=(*NOT_BODY_FIELDS, *HIRES_FIELDS, "outpaint_pixels", "outpaint_directions"),
    doc="A1111's /sdapi/v1/img2img body: pictures as base64 (data: URLs allowed), options by index.",
)


class ImagesResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str


class ModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class EmbeddingItem(BaseModel):
    step: int | None
    sd_checkpoint: str | None
    sd_checkpoint_name: str | None
    shape: int  # width of each vector
    vectors: int


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]  # usable with the loaded model
    skipped: dict[str, EmbeddingItem]  # made for a text encoder of another width


class PromptStyleItem(BaseModel):
    name: str
    prompt: str | None
    negative_prompt: str | None


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    job: str
    job_count: int
    sampling_step: int
    sampling_steps: int


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None
    textinfo: str | None


class ScriptArgItem(BaseModel):
    label: str
    value: Any = None
    minimum: Any = None
    maximum: Any = None
    step: Any = None
    choices: list[str] | None = None


class ScriptInfoItem(BaseModel):
    name: str
    is_alwayson: bool
    is_img2img: bool
    args: list[ScriptArgItem]


class ScriptsResponse(BaseModel):
    txt2img: list[str]
    img2img: list[str]


class PngInfoBody(BaseModel):
    image: str


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]
    # Pictures of other tools (ComfyUI, InvokeAI, NovelAI, Fooocus): the tool, what of its
    # parameters did not map, and why its data could not be read, if it could not.
    tool: str | None = None
    not_mapped: list[str] = []
    error: str | None = None


class ExtrasApiFields(RequestBody):
    """What A1111's extras routes take beside the request's own fields; face restoration is
    accepted but must stay 0."""

    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscale_first: bool = False


ExtrasBody = request_body("ExtrasBody", ExtrasRequest, base=ExtrasApiFields,
                          api_names={"upscaler_2_visibility": "extras_upscaler_2_visibility"},
                          doc="A1111's ExtrasBaseRequest.")


class ExtrasSingleImageBody(ExtrasBody):
    image: str


class FileData(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImagesBody(ExtrasBody):
    imageList: list[FileData]


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None
    model_path: str | None
    model_url: str | None
    scale: float | None


class LatentUpscaleModeItem(BaseModel):
    name: str
