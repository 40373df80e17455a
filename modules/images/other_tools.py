"""Pictures made by other tools: the generation parameters that ComfyUI, InvokeAI, NovelAI and
Fooocus write into their files, read with sd-parsers and mapped onto A1111's infotext keys, so
that PNG Info shows them and "Send to" fills a tab's fields through the usual infotext path.

    ComfyUI    "prompt": the graph that ran, as JSON ("workflow", the editor's layout, is not needed)
    InvokeAI   "invokeai_metadata" (3.x and later), "sd-metadata" or "Dream" (2.x)
    NovelAI    "Comment" (JSON) beside "Software: NovelAI", the prompt in "Description"
    Fooocus    "parameters" holding a JSON object where A1111 writes its text, "fooocus_scheme"

Only what means the same here is mapped. The rest a tool recorded (a graph of several samplers,
samplers and schedules this web UI lacks, custom nodes, styles, LoRA loaders) is listed as not
mapped, never guessed. A1111's own pictures are not this module's business: `read` gives None.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from sd_parsers.data import PromptInfo
from sd_parsers.parsers import ComfyUIParser, FooocusParser, InvokeAIParser, NovelAIParser

from modules.images.image_info import PARAMETERS, ImageInfo
from modules.images.infotext import format_infotext, format_params_line, parse_infotext

# The largest seed a request here takes (A1111's, generation/request.py's MAX_SEED).
LARGEST_SEED = 2**32 - 1

# k-diffusion's samplers by A1111's names for them (A1111's sd_samplers_kdiffusion table).
# ComfyUI and Fooocus name a sampler by its k-diffusion function without "sample_" (older ComfyUI
# kept the prefix); "_gpu" only moves the SDE samplers' Brownian noise to the GPU. ComfyUI's
# dpm_fast and dpm_adaptive run with eta 0 where A1111's run with 1, so they are not the same.
COMFYUI_SAMPLERS = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "lms": "LMS",
    "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a", "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_2m": "DPM++ 2M", "dpmpp_sde": "DPM++ SDE", "dpmpp_sde_gpu": "DPM++ SDE",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_gpu": "DPM++ 2M SDE",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun_gpu": "DPM++ 2M SDE Heun",
    "dpmpp_3m_sde": "DPM++ 3M SDE", "dpmpp_3m_sde_gpu": "DPM++ 3M SDE",
    "lcm": "LCM", "ddim": "DDIM", "uni_pc": "UniPC",  # uni_pc is UniPC's bh1 variant, A1111's
}
# ComfyUI's schedulers by A1111's schedule names: "normal" spaces timesteps evenly from the
# highest to the lowest, as k-diffusion's own levels (A1111's Uniform) do; "ddim_uniform" is the
# scheduler A1111 copied as "DDIM".
COMFYUI_SCHEDULES = {
    "normal": "Uniform", "karras": "Karras", "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform", "ddim_uniform": "DDIM",
}
# The "k_" names that NovelAI and InvokeAI 2.x wrote (A1111's aliases are the same kind).
K_SAMPLERS = {
    "k_euler": "Euler", "k_euler_a": "Euler a", "k_euler_ancestral": "Euler a", "k_heun": "Heun",
    "k_lms": "LMS", "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a", "k_dpm_2_ancestral": "DPM2 a",
    "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_2s_ancestral": "DPM++ 2S a", "k_dpmpp_sde": "DPM++ SDE",
    "k_dpmpp_2m_sde": "DPM++ 2M SDE", "ddim": "DDIM", "plms": "PLMS",
}
NOVELAI_SCHEDULES = {"karras": "Karras", "exponential": "Exponential", "polyexponential": "Polyexponential"}
# InvokeAI 2.x's two DPM++ names, and the diffusers schedulers of InvokeAI 2.3 and later; their
# "_k" forms use Karras levels. InvokeAI's dpmpp_2s is single-step, not ancestral: no match here.
INVOKEAI_SAMPLERS = {
    **K_SAMPLERS, "k_dpmpp_2": "DPM++ 2M", "k_dpmpp_2_a": "DPM++ 2S a",
    "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "lms": "LMS", "kdpm_2": "DPM2",
    "kdpm_2_a": "DPM2 a", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE", "unipc": "UniPC", "lcm": "LCM",
}

# Values by which a tool says a setting is off, and nothing needs mapping.
_UNSET_TEXT = ("", "None", "[]")
_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
# Graph nodes that take no part in what a request sets: saving, showing and decoding the result.
_COMFYUI_PASSIVE = {"SaveImage", "PreviewImage", "VAEDecode", "Reroute"}
_SHORT = 80
# A1111's order of the keys in its parameters line.
_ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
          "Denoising strength", "Clip skip", "RNG", "Refiner", "Refiner switch at")


@dataclass(frozen=True)
class ToolInfo:
    """What another tool recorded, as far as it maps onto a request here."""

    tool: str  # the tool's name, for a person: "ComfyUI"
    prompt: str = ""
    negative_prompt: str = ""
    params: dict[str, object] = field(default_factory=dict)  # A1111 infotext key -> value
    not_mapped: tuple[str, ...] = ()  # what the tool recorded that no field here takes, for a person
    error: str | None = None  # why the tool's data could not be read, for a person

    @property
    def infotext(self) -> str:
        """The mapped parameters as A1111 writes them; "" when nothing mapped."""
        if not (self.prompt or self.negative_prompt or self.params):
            return ""
        return format_infotext(self.prompt, self.negative_prompt, self.params)


class _Unreadable(Exception):
    """The tool's data is there but cannot be read; the message is for a person."""


def read(info: ImageInfo, size: tuple[int, int] | None = None) -> ToolInfo | None:
    """The parameters another tool wrote into a picture, mapped; None when the picture holds
    A1111's infotext or nothing a known tool writes. `size` is the picture's, which NovelAI's
    older pictures are generated at without recording it. Never raises."""
    items = info.items
    if _is_fooocus(info):
        tool, reader = "Fooocus", lambda: _fooocus(info.parameters)
    elif info.parameters:
        return None
    elif "workflow" in items or _holds_json_object(items.get("prompt", "")):
        tool, reader = "ComfyUI", lambda: _comfyui(items)
    elif {"invokeai_metadata", "sd-metadata", "Dream"} & items.keys():
        tool, reader = "InvokeAI", lambda: _invokeai(items)
    elif "Comment" in items and items.get("Software", "").startswith("NovelAI"):
        tool, reader = "NovelAI", lambda: _novelai(items, size)
    else:
        return None
    try:
        return reader()
    except _Unreadable as e:
        return ToolInfo(tool, error=f"The {tool} parameters in this picture cannot be read: {e}")
    except Exception as e:  # sd-parsers meets damaged data with errors of every kind
        cause = e.__cause__
        reason = f"{e} (missing {cause})" if isinstance(cause, KeyError) else f"{e} ({cause})" if cause else str(e)
        return ToolInfo(tool, error=f"The {tool} parameters in this picture cannot be read: {reason or type(e).__name__}")


def _is_fooocus(info: ImageInfo) -> bool:
    """Fooocus marks its JSON with "fooocus_scheme"; A1111's infotext is never a JSON object, so
    one in "parameters" is a tool's even without the mark."""
    return info.items.get("fooocus_scheme") == "fooocus" or _holds_json_object(info.parameters)


def _holds_json_object(text: str) -> bool:
    if not text.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _json_object(text: str, name: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise _Unreadable(f'its "{name}" text is not valid JSON ({e})')
    if not isinstance(value, dict):
        raise _Unreadable(f'its "{name}" text is JSON but not an object of named values')
    return value


def _unset(value: object) -> bool:
    return value is None or value is False or value == [] or value == {} or value in _UNSET_TEXT


def _short(value: object) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= _SHORT else text[:_SHORT - 1] + "…"


def _model_name(name: str) -> str:
    """A1111's "Model": the checkpoint's file name without folder and extension (a name such as
    "sd_xl_base_1.0" keeps its dot)."""
    name = re.split(r"[\\/]", name)[-1]
    for suffix in _CHECKPOINT_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


class _Mapping:
    """Collects a ToolInfo: what mapped, and what did not."""

    def __init__(self, tool: str):
        self.tool = tool
        self.prompt = ""
        self.negative = ""
        self.params: dict[str, object] = {}
        self.not_mapped: list[str] = []

    def sampler(self, name: object, table: dict[str, str]) -> None:
        if isinstance(name, str) and name.lower() in table:
            self.params["Sampler"] = table[name.lower()]
        else:
            self.not_mapped.append(f"sampler {_short(name)} (no such sampler here)")

    def schedule(self, name: object, table: dict[str, str]) -> None:
        if name is None:
            self.not_mapped.append(f"schedule type (not recorded by {self.tool})")
        elif isinstance(name, str) and name.lower() in table:
            self.params["Schedule type"] = table[name.lower()]
        else:
            self.not_mapped.append(f"schedule type {_short(name)} (no such schedule type here)")

    def number(self, key: str, value: object, kind: type = int) -> None:
        if value is None:
            return
        try:
            self.params[key] = round(float(value), 6) if kind is float else kind(value)  # 0.87, not 0.8700000000000001
        except (TypeError, ValueError):
            self.not_mapped.append(f"{key} {_short(value)} (not a number)")

    def seed(self, value: object) -> None:
        try:
            seed = int(value)
        except (TypeError, ValueError):
            if value is not None:
                self.not_mapped.append(f"seed {_short(value)} (not a number)")
            return
        if 0 <= seed <= LARGEST_SEED:
            self.params["Seed"] = seed
        else:
            self.not_mapped.append(f"seed {seed} (outside 0 to {LARGEST_SEED}, the seeds this web UI takes)")

    def size(self, width: object, height: object) -> None:
        try:
            self.params["Size"] = f"{int(width)}x{int(height)}"
        except (TypeError, ValueError):
            if (width, height) != (None, None):
                self.not_mapped.append(f"size {_short(width)} x {_short(height)}")

    def model(self, name: object) -> None:
        if isinstance(name, str) and name:
            self.params["Model"] = _model_name(name)

    def rest(self, values: dict, *, ignore: set[str] = frozenset(), defaults: dict | None = None, prefix: str = "") -> None:
        """Lists each value not mapped, unless the tool means "off" by it."""
        defaults = defaults or {}
        for key, value in values.items():
            if key in ignore or _unset(value) or (key in defaults and value == defaults[key]):
                continue
            self.not_mapped.append(f"{prefix}{key}: {_short(value)}")

    def result(self) -> ToolInfo:
        params = {key: self.params[key] for key in _ORDER if key in self.params}
        not_mapped = self.not_mapped
        line = format_params_line(params)
        if params and not parse_infotext(line)[2]:
            # A1111 reads a last line of fewer than three values as prompt: pasted, they would land there.
            not_mapped = [*not_mapped, f"{line} (too few values for A1111's parameters line)"]
            params = {}
        return ToolInfo(self.tool, self.prompt, self.negative, params, tuple(not_mapped))


def _joined(prompts: list) -> str:
    """One prompt from the pieces sd-parsers cut it into (InvokeAI 2.x's "[negative]" parts taken out)."""
    return ", ".join(p.value for p in prompts)


# -- ComfyUI ---------------------------------------------------------------------------------------

def _is_link(value: object) -> bool:
    """An input fed by another node's output: [node id, output index]."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _links(graph: dict) -> list:
    """sd-parsers' graph edges, in the editor workflow's form [id, from, slot, to, slot, type],
    taken from the graph that ran. The type is the input's name in capitals, which is the
    type itself for the "clip" inputs that sd-parsers must not follow when it looks for prompts."""
    return [[0, str(value[0]), value[1], node_id, 0, name.upper()]
            for node_id, node in graph.items() for name, value in node["inputs"].items() if _is_link(value)]


def _node_text(node_id: str, node: dict) -> str:
    values = ", ".join(f"{k}: {_short(v)}" for k, v in node["inputs"].items() if not _is_link(v))
    return f"{node['class_type']} #{node_id}" + (f" ({values})" if values else "")


def _graph_prompt(prompts: list, what: str, m: _Mapping) -> str:
    values = [p.value for p in prompts if isinstance(p.value, str)]
    if len(values) == 1:
        return values[0]
    if values:
        joined = "; ".join(f"#{p.prompt_id} {_short(p.value)!r}" for p in prompts)
        m.not_mapped.append(f"{len(values)} {what} prompts, combined by the graph: {joined}")
    return ""


def _comfyui(items: dict[str, str]) -> ToolInfo:
    if "prompt" not in items:
        raise _Unreadable('it holds the editor\'s "workflow" but not the "prompt" graph that ran')
    graph = {str(k): v for k, v in _json_object(items["prompt"], "prompt").items()}
    if not all(isinstance(node, dict) and isinstance(node.get("class_type"), str) and isinstance(node.get("inputs", {}), dict)
               for node in graph.values()):
        raise _Unreadable('its "prompt" text is JSON but not a graph of nodes')
    graph = {node_id: {**node, "inputs": node.get("inputs", {})} for node_id, node in graph.items()}
    found = ComfyUIParser().parse({"prompt": graph, "workflow": {"links": _links(graph)}})
    m = _Mapping("ComfyUI")
    used = {s.sampler_id for s in found.samplers}
    if len(found.samplers) == 1:
        used |= _comfyui_sampler(found, graph, m)
    elif found.samplers:
        samplers = ", ".join(_node_text(s.sampler_id, graph[s.sampler_id]) for s in found.samplers)
        m.not_mapped.append(f"{len(found.samplers)} samplers in one graph, not one request: {samplers}")
    for node_id, node in graph.items():
        if node_id not in used and node["class_type"] not in _COMFYUI_PASSIVE:
            m.not_mapped.append(_node_text(node_id, node))
    return m.result()


def _comfyui_sampler(found: PromptInfo, graph: dict, m: _Mapping) -> set[str]:
    """Maps the graph's one sampler and what feeds it; gives the ids of the nodes mapped."""
    sampler = found.samplers[0]
    node = graph[sampler.sampler_id]
    used = set()
    values = dict(sampler.parameters)
    name = sampler.name
    m.sampler(name.removeprefix("sample_") if isinstance(name, str) else name, COMFYUI_SAMPLERS)
    m.schedule(values.pop("scheduler", None), COMFYUI_SCHEDULES)
    steps = values.pop("steps", None)
    m.number("Steps", steps)
    m.number("CFG scale", values.pop("cfg_scale", None), float)
    m.seed(values.pop("seed", values.pop("noise_seed", None)))
    if "Seed" in m.params:  # ComfyUI draws the starting noise from torch's CPU generator, as A1111's CPU RNG does
        m.params["RNG"] = "CPU"
    denoise = values.pop("denoise", 1.0)
    if denoise != 1:
        m.number("Denoising strength", denoise, float)
        m.not_mapped.append(f"denoise {_short(denoise)} (ComfyUI runs all {steps} steps at it, img2img here fewer)")
    if isinstance(steps, int) and isinstance(values.get("end_at_step"), int) and values["end_at_step"] >= steps:
        del values["end_at_step"]  # KSamplerAdvanced's "to the end"
    m.rest(values, prefix=f"{node['class_type']} #{sampler.sampler_id} ",
           ignore={"random_seed_after_every_gen", "control_after_generate"},  # the editor's, not the sampler's
           defaults={"add_noise": "enable", "start_at_step": 0, "return_with_leftover_noise": "disable"})

    if sampler.model is not None and isinstance(sampler.model.name, str):
        m.model(sampler.model.name)
        used.add(sampler.model.model_id)
    m.prompt = _graph_prompt(sampler.prompts, "positive", m)
    m.negative = _graph_prompt(sampler.negative_prompts, "negative", m)
    used |= {p.prompt_id for p in [*sampler.prompts, *sampler.negative_prompts]}

    latent = node["inputs"].get("latent_image")
    if _is_link(latent) and graph.get(str(latent[0]), {}).get("class_type") == "EmptyLatentImage":
        source = graph[str(latent[0])]["inputs"]
        m.size(source.get("width"), source.get("height"))  # its batch size: A1111 writes none either
        used.add(str(latent[0]))
    layers = {node_id: n["inputs"].get("stop_at_clip_layer") for node_id, n in graph.items()
              if n["class_type"] == "CLIPSetLastLayer"}
    first = next(iter(layers.values()), None)
    if isinstance(first, int) and first < 0 and all(layer == first for layer in layers.values()):
        m.params["Clip skip"] = -first  # the last layer, -1, is A1111's Clip skip 1
        used |= layers.keys()
    return used


# -- Fooocus ---------------------------------------------------------------------------------------

_FOOOCUS_DESCRIPTIVE = {"full_prompt", "full_negative_prompt", "prompt_expansion", "metadata_scheme", "version"}


def _fooocus(text: str) -> ToolInfo:
    _json_object(text, PARAMETERS)
    found = FooocusParser().parse({PARAMETERS: text})
    sampler = found.samplers[0]
    m = _Mapping("Fooocus")
    values = dict(sampler.parameters)
    m.prompt = _joined(sampler.prompts)
    m.negative = _joined(sampler.negative_prompts)
    m.sampler(sampler.name, COMFYUI_SAMPLERS)  # Fooocus samples with ComfyUI's code and names
    m.schedule(values.pop("scheduler", None), COMFYUI_SCHEDULES)
    m.number("Steps", values.pop("steps", None))
    m.number("CFG scale", values.pop("cfg_scale", None), float)
    m.seed(values.pop("seed", None))
    if "Seed" in m.params:  # ComfyUI's starting noise, see _comfyui_sampler
        m.params["RNG"] = "CPU"
    rest = dict(found.metadata)
    size = re.fullmatch(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)", str(rest.get("resolution", "")))
    if size:
        m.size(*size.groups())  # Fooocus writes (width, height)
        del rest["resolution"]
    if sampler.model is not None:
        m.model(sampler.model.name)
        if re.fullmatch(r"[0-9a-f]{10}", str(sampler.model.hash)):
            m.params["Model hash"] = sampler.model.hash  # A1111's short hash, as Fooocus computes it
    m.number("Clip skip", rest.pop("clip_skip", None))  # Fooocus counts as A1111 does: 1 skips none
    refiner = rest.pop("refiner_model", None)
    switch = rest.pop("refiner_switch", None)
    if not _unset(refiner):
        m.params["Refiner"] = _model_name(str(refiner))
        m.number("Refiner switch at", switch, float)
    m.rest(values)
    m.rest(rest, ignore=_FOOOCUS_DESCRIPTIVE, defaults={"vae": "Default (model)"})
    return m.result()


# -- InvokeAI --------------------------------------------------------------------------------------

_INVOKEAI_DESCRIPTIVE = {"generation_mode", "app_id", "app_version", "model", "model_hash", "model_weights"}
_COMPEL_WEIGHTS = re.compile(r"\w[+-]+(?=[\s,]|$)|\)[\d.]+")


def _invokeai(items: dict[str, str]) -> ToolInfo:
    raw = {}
    for key in ("sd-metadata", "invokeai_metadata"):
        if key in items:
            raw = _json_object(items[key], key)
    found = InvokeAIParser().parse(items)
    sampler = found.samplers[0]
    m = _Mapping("InvokeAI")
    values = dict(sampler.parameters)
    m.prompt = _joined(sampler.prompts)
    m.negative = _joined(sampler.negative_prompts)
    name = str(sampler.name).lower()
    if name.endswith("_k"):
        m.sampler(name[:-2], INVOKEAI_SAMPLERS)
        m.params["Schedule type"] = "Karras"
    else:
        m.sampler(name, INVOKEAI_SAMPLERS)
        m.schedule(None, {})  # the model's own diffusers spacing, or InvokeAI 2.x's choice: not written down
    m.number("Steps", values.pop("steps", None))
    m.number("CFG scale", values.pop("cfg_scale", None), float)
    m.seed(values.pop("seed", None))
    rest = dict(found.metadata)
    m.size(rest.pop("width", None), rest.pop("height", None))
    m.number("Denoising strength", rest.pop("strength", None), float)
    device = str(rest.pop("rand_device", "")).lower()
    if device in ("cpu", "cuda"):
        m.params["RNG"] = "CPU" if device == "cpu" else "GPU"
    skip = rest.pop("clip_skip", 0)
    if isinstance(skip, int) and skip > 0:
        m.params["Clip skip"] = skip + 1  # InvokeAI counts the layers skipped, A1111 the layer used from the end
    model = sampler.model.name if sampler.model else (raw.get("model") or {}).get("name")
    m.model(model)
    if _COMPEL_WEIGHTS.search(f"{m.prompt} {m.negative}"):
        m.not_mapped.append("InvokeAI's prompt weights (word+, (words)1.2) are kept as written")
    m.rest(values, defaults={"cfg_rescale_multiplier": 0, "perlin": 0, "threshold": 0})
    m.rest(rest, ignore=_INVOKEAI_DESCRIPTIVE, defaults={"type": "txt2img"})
    return m.result()


# -- NovelAI ---------------------------------------------------------------------------------------

_NOVELAI_DESCRIPTIVE = {"prompt", "request_type", "signed_hash", "n_samples", "v4_prompt", "v4_negative_prompt", "params_version"}
_NOVELAI_OFF = {"noise": 0, "uncond_scale": 1, "cfg_rescale": 0, "controlnet_strength": 1}


def _novelai(items: dict[str, str], size: tuple[int, int] | None) -> ToolInfo:
    _json_object(items["Comment"], "Comment")
    found = NovelAIParser().parse({"Description": "", "Source": "", **items})
    sampler = found.samplers[0]
    m = _Mapping("NovelAI")
    values = dict(sampler.parameters)
    rest = dict(found.metadata)
    m.prompt = _joined(sampler.prompts)
    m.negative = _joined(sampler.negative_prompts)
    m.sampler(sampler.name, K_SAMPLERS)
    m.schedule(rest.pop("noise_schedule", None), NOVELAI_SCHEDULES)
    m.number("Steps", rest.pop("steps", None))
    m.number("CFG scale", values.pop("cfg_scale", None), float)
    m.seed(values.pop("seed", None))
    width, height = rest.pop("width", None), rest.pop("height", None)
    m.size(*((width, height) if width and height else size or (None, None)))  # A1111 takes the picture's size
    if rest.get("request_type") == "Img2ImgRequest":
        m.number("Denoising strength", values.pop("strength", None), float)
    elif "request_type" in rest:
        values.pop("strength", None)  # written with every picture, used only from a picture
    m.not_mapped.append(f"model {_short(items.get('Source') or 'unnamed')} (NovelAI's own)")
    if re.search(r"[{}\[\]]", f"{m.prompt} {m.negative}"):
        m.not_mapped.append("NovelAI's {emphasis} and [de-emphasis] in the prompt are kept as written")
    m.rest(values, defaults=_NOVELAI_OFF)
    m.rest(rest, ignore=_NOVELAI_DESCRIPTIVE, defaults=_NOVELAI_OFF)
    return m.result()
