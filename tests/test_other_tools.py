"""PNG Info for other tools' pictures: ComfyUI, InvokeAI, NovelAI and Fooocus metadata, in the
layouts those tools write (taken from sd-parsers' test pictures), mapped onto A1111's parameters
that "Send to" pastes; what does not map is listed, broken data gives a message, and A1111's own
pictures read as before."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from k_diffusion.external import DiscreteSchedule
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from modules.api import routes
from modules.app.config import Flags
from modules.context import AppContext
from modules.generation.request import MAX_SEED
from modules.images import other_tools
from modules.images.image_info import read_bytes
from modules.images.infotext import parse_infotext
from modules.sampling.registry import find_sampler
from modules.sampling.schedules import find_schedule
from modules.ui.paste import field_values
from modules.ui.png_info import info_html

FIELDS = ["prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "seed", "width", "height",
          "clip_skip", "noise_source", "checkpoint", "denoising_strength"]
A1111_TEXT = ("a photo of a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
              "CFG scale: 7, Seed: 1234567890, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly")

# ComfyUI's default graph, with CLIP skip 2: the "prompt" chunk as ComfyUI's SaveImage writes it.
COMFYUI_GRAPH = {
    "3": {"inputs": {"seed": 1234, "steps": 25, "cfg": 6.5, "sampler_name": "euler_ancestral", "scheduler": "karras",
                     "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]},
          "class_type": "KSampler"},
    "4": {"inputs": {"ckpt_name": "SD15/v1-5-pruned-emaonly.safetensors"}, "class_type": "CheckpointLoaderSimple"},
    "5": {"inputs": {"width": 512, "height": 768, "batch_size": 1}, "class_type": "EmptyLatentImage"},
    "6": {"inputs": {"text": "a red fox in the snow\n", "clip": ["10", 0]}, "class_type": "CLIPTextEncode"},
    "7": {"inputs": {"text": "blurry, lowres", "clip": ["10", 0]}, "class_type": "CLIPTextEncode"},
    "8": {"inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "class_type": "VAEDecode"},
    "9": {"inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}, "class_type": "SaveImage"},
    "10": {"inputs": {"stop_at_clip_layer": -2, "clip": ["4", 1]}, "class_type": "CLIPSetLastLayer"},
}
# Two passes, as in ComfyUI's "2 pass txt2img" example: a second KSampler on the upscaled latent.
COMFYUI_TWO_PASSES = {
    **COMFYUI_GRAPH,
    "8": {"inputs": {"samples": ["12", 0], "vae": ["4", 2]}, "class_type": "VAEDecode"},
    "11": {"inputs": {"upscale_method": "nearest-exact", "width": 1024, "height": 1536, "crop": "disabled",
                      "samples": ["3", 0]}, "class_type": "LatentUpscale"},
    "12": {"inputs": {"seed": 99, "steps": 14, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "simple", "denoise": 0.5,
                      "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["11", 0]},
           "class_type": "KSampler"},
}
_TYPES = {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING", "latent_image": "LATENT",
          "samples": "LATENT", "vae": "VAE", "images": "IMAGE", "clip": "CLIP"}

# The other tools' chunks, from sd-parsers' test pictures.
FOOOCUS_PARAMETERS = {
    "adm_guidance": "(1.5, 0.8, 0.3)", "base_model": "juggernautXL_v8Rundiffusion", "base_model_hash": "aeb7e9e689",
    "clip_skip": 2, "full_negative_prompt": ["(worst quality, low quality:1.4)", "anime, cartoon"],
    "full_prompt": ["cinematic still a smiling goldfish . emotional", "a smiling goldfish, deep focus"],
    "guidance_scale": 4, "loras": [], "metadata_scheme": "fooocus", "negative_prompt": "", "performance": "Speed",
    "prompt": "a smiling goldfish", "prompt_expansion": "a smiling goldfish, deep focus", "refiner_model": "None",
    "refiner_switch": 0.5, "resolution": "(768, 1280)", "sampler": "dpmpp_2m_sde_gpu", "scheduler": "karras",
    "seed": "6952411511246973023", "sharpness": 2, "steps": 30,
    "styles": "['Fooocus V2', 'Fooocus Enhance', 'Fooocus Sharp']", "vae": "Default (model)", "version": "Fooocus v2.4.3",
}
INVOKEAI_METADATA = {
    "generation_mode": "sdxl_txt2img", "positive_prompt": "digital artwork, oil painting. painterly brushstrokes, holidays,",
    "negative_prompt": "grainy+, photo, oversaturated", "width": 1024, "height": 1024, "seed": 3293022630,
    "rand_device": "cpu", "cfg_scale": 8.0, "cfg_rescale_multiplier": 0.0, "steps": 35, "scheduler": "euler",
    "model": {"model_name": "juggernautXL", "base_model": "sdxl", "model_type": "main"},
    "ipAdapters": [{"image": {"image_name": "21b3ddb9.png"}, "ip_adapter_model": {"model_name": "ip-adapter-plus_sdxl_vit-h"},
                    "weight": 0.45}],
    "vae": {"model_name": "VAEFix", "base_model": "sdxl"}, "positive_style_prompt": "", "negative_style_prompt": "",
}
INVOKEAI_SD_METADATA = {
    "model": "stable diffusion", "model_weights": "deliberateForInvoke_v08", "model_hash": "56d1442a0feefd64836a",
    "app_id": "invoke-ai/InvokeAI", "app_version": "2.3.0",
    "image": {"prompt": [{"prompt": "full body photo of a young woman [rendering, glowing eyes]", "weight": 1.0}],
              "steps": 50, "cfg_scale": 5, "threshold": 0, "perlin": 0, "height": 768, "width": 512, "seed": 2980747362,
              "seamless": False, "hires_fix": False, "type": "txt2img",
              "postprocessing": [{"type": "esrgan", "scale": 4, "strength": 0.95}], "sampler": "k_lms", "variations": []},
}
NOVELAI_CHUNKS = {
    "Title": "AI generated image", "Description": "masterpiece, best quality,  cat, space, icon", "Software": "NovelAI",
    "Source": "Stable Diffusion 1D44365E",
    "Comment": json.dumps({"steps": 50, "sampler": "k_euler_ancestral", "seed": 2253955223, "strength": 0.4, "noise": 0.0,
                           "scale": 10.0, "uc": "lowres, bad anatomy, bad hands"}),
}


def workflow_of(graph: dict) -> dict:
    """The editor's "workflow" chunk for a graph, in ComfyUI's layout: nodes and typed links."""
    inputs = [(node_id, name, value) for node_id, node in graph.items() for name, value in node["inputs"].items()
              if isinstance(value, list)]
    links = [[n, int(value[0]), value[1], int(node_id), 0, _TYPES.get(name, name.upper())]
             for n, (node_id, name, value) in enumerate(inputs, start=1)]
    nodes = [{"id": int(node_id), "type": node["class_type"], "mode": 0,
              "widgets_values": [v for v in node["inputs"].values() if not isinstance(v, list)]}
             for node_id, node in graph.items()]
    return {"last_node_id": max(map(int, graph)), "last_link_id": len(links), "nodes": nodes, "links": links, "version": 0.4}


def comfyui_chunks(graph: dict) -> dict[str, str]:
    return {"prompt": json.dumps(graph), "workflow": json.dumps(workflow_of(graph))}


def png_with(chunks: dict[str, str], size=(64, 96)) -> bytes:
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 60, 200)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def read(chunks: dict[str, str], size=(64, 96)) -> other_tools.ToolInfo | None:
    image, info = read_bytes(png_with(chunks, size))
    return other_tools.read(info, image.size)


def params_of(tool: other_tools.ToolInfo) -> dict[str, str]:
    return parse_infotext(tool.infotext)[2]


@pytest.fixture
def ctx(tmp_path):
    context = AppContext.create(Flags(data_dir=tmp_path, device="cpu"))
    (context.paths.checkpoints / "v1-5-pruned-emaonly.safetensors").write_bytes(b"")
    return context


@pytest.fixture
def post(ctx):
    app = FastAPI()
    routes.install(app, ctx)
    client = TestClient(app)
    return lambda data: client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(data).decode()})


def test_comfyui_graph_maps_to_a1111_parameters():
    tool = read(comfyui_chunks(COMFYUI_GRAPH))
    assert tool.tool == "ComfyUI" and tool.error is None
    assert tool.prompt == "a red fox in the snow" and tool.negative_prompt == "blurry, lowres"
    assert params_of(tool) == {"Steps": "25", "Sampler": "Euler a", "Schedule type": "Karras", "CFG scale": "6.5",
                               "Seed": "1234", "Size": "512x768", "Model": "v1-5-pruned-emaonly", "Clip skip": "2", "RNG": "CPU"}
    assert tool.not_mapped == ()


def test_comfyui_graph_without_the_editor_workflow_reads_the_same():
    """Pictures made through ComfyUI's API carry only the graph that ran."""
    assert read({"prompt": json.dumps(COMFYUI_GRAPH)}) == read(comfyui_chunks(COMFYUI_GRAPH))


def test_comfyui_mapped_text_pastes_into_txt2img_fields(ctx):
    values = field_values(ctx, read(comfyui_chunks(COMFYUI_GRAPH)).infotext, {name: name for name in FIELDS})
    assert values == {"prompt": "a red fox in the snow", "negative_prompt": "blurry, lowres", "sampler_name": "Euler a",
                      "scheduler": "Karras", "steps": 25, "cfg_scale": 6.5, "seed": 1234, "width": 512, "height": 768,
                      "clip_skip": 2, "noise_source": "CPU", "checkpoint": "v1-5-pruned-emaonly.safetensors"}


def test_comfyui_two_samplers_are_listed_not_guessed():
    tool = read(comfyui_chunks(COMFYUI_TWO_PASSES))
    assert tool.infotext == "" and tool.prompt == ""
    first, *rest = tool.not_mapped
    assert first.startswith("2 samplers in one graph") and "KSampler #3" in first and "KSampler #12" in first
    assert "sampler_name: dpmpp_2m" in first and "scheduler: simple" in first
    assert any(line.startswith("LatentUpscale #11 (upscale_method: nearest-exact, width: 1024") for line in rest)
    assert any(line.startswith("CheckpointLoaderSimple #4") for line in rest)
    assert not any(line.startswith(("SaveImage", "VAEDecode")) for line in rest)  # they set nothing


def test_comfyui_unknown_sampler_schedule_custom_nodes_and_large_seed_are_listed():
    graph = json.loads(json.dumps(COMFYUI_GRAPH))
    graph["3"]["inputs"].update(sampler_name="uni_pc_bh2", scheduler="simple", seed=335608130539327, denoise=0.6,
                                model=["20", 0])
    graph["20"] = {"inputs": {"lora_name": "detail.safetensors", "strength_model": 0.8, "strength_clip": 0.8,
                              "model": ["4", 0], "clip": ["4", 1]}, "class_type": "LoraLoader"}
    graph["21"] = {"inputs": {"weight": 0.7, "image": ["22", 0]}, "class_type": "IPAdapterAdvanced"}
    tool = read(comfyui_chunks(graph))
    assert "sampler uni_pc_bh2 (no such sampler here)" in tool.not_mapped
    assert "schedule type simple (no such schedule type here)" in tool.not_mapped
    assert "seed 335608130539327 (outside 0 to 4294967295, the seeds this web UI takes)" in tool.not_mapped
    assert "denoise 0.6 (ComfyUI runs all 25 steps at it, img2img here fewer)" in tool.not_mapped
    assert "IPAdapterAdvanced #21 (weight: 0.7)" in tool.not_mapped
    # The checkpoint reaches the sampler through a LoRA: neither is taken as the model.
    assert "LoraLoader #20 (lora_name: detail.safetensors, strength_model: 0.8, strength_clip: 0.8)" in tool.not_mapped
    assert "CheckpointLoaderSimple #4 (ckpt_name: SD15/v1-5-pruned-emaonly.safetensors)" in tool.not_mapped
    params = params_of(tool)
    assert "Sampler" not in params and "Schedule type" not in params and "Seed" not in params and "Model" not in params
    assert params["Steps"] == "25" and params["Denoising strength"] == "0.6" and tool.prompt == "a red fox in the snow"


def test_fooocus_json_is_mapped_not_read_as_a1111_fields(ctx):
    tool = read({"parameters": json.dumps(FOOOCUS_PARAMETERS), "fooocus_scheme": "fooocus"})
    assert tool.tool == "Fooocus" and tool.error is None
    assert tool.prompt == "a smiling goldfish" and tool.negative_prompt == ""
    assert params_of(tool) == {"Steps": "30", "Sampler": "DPM++ 2M SDE", "Schedule type": "Karras", "CFG scale": "4",
                               "Size": "768x1280", "Model hash": "aeb7e9e689", "Model": "juggernautXL_v8Rundiffusion",
                               "Clip skip": "2"}
    assert set(tool.not_mapped) == {
        "seed 6952411511246973023 (outside 0 to 4294967295, the seeds this web UI takes)", "sharpness: 2",
        "adm_guidance: (1.5, 0.8, 0.3)", "performance: Speed", "styles: ['Fooocus V2', 'Fooocus Enhance', 'Fooocus Sharp']"}
    values = field_values(ctx, tool.infotext, {name: name for name in FIELDS})
    assert values["prompt"] == "a smiling goldfish" and values["sampler_name"] == "DPM++ 2M SDE" and values["width"] == 768


def test_fooocus_json_is_recognised_without_its_scheme_mark_and_in_range_seeds_map():
    refined = {**FOOOCUS_PARAMETERS, "seed": "42", "refiner_model": "sd_xl_refiner_1.0.safetensors"}
    tool = read({"parameters": json.dumps(refined)})
    assert tool.tool == "Fooocus"
    params = params_of(tool)
    assert params["Seed"] == "42" and params["RNG"] == "CPU"
    assert params["Refiner"] == "sd_xl_refiner_1.0" and params["Refiner switch at"] == "0.5"


def test_fooocus_over_the_api_gives_a1111_named_parameters(post):
    body = post(png_with({"parameters": json.dumps(FOOOCUS_PARAMETERS), "fooocus_scheme": "fooocus"})).json()
    assert body["tool"] == "Fooocus" and body["error"] is None
    assert set(body["parameters"]) == {"Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Size",
                                       "Model hash", "Model", "Clip skip"}
    assert body["parameters"]["Prompt"] == "a smiling goldfish" and body["info"].startswith("a smiling goldfish\nSteps: 30")
    assert json.loads(body["items"]["parameters"]) == FOOOCUS_PARAMETERS and body["items"]["fooocus_scheme"] == "fooocus"
    assert "styles: ['Fooocus V2', 'Fooocus Enhance', 'Fooocus Sharp']" in body["not_mapped"]


def test_invokeai_metadata_maps():
    tool = read({"invokeai_metadata": json.dumps(INVOKEAI_METADATA)})
    assert tool.tool == "InvokeAI" and tool.prompt.startswith("digital artwork") and tool.negative_prompt.startswith("grainy+")
    assert params_of(tool) == {"Steps": "35", "Sampler": "Euler", "CFG scale": "8", "Seed": "3293022630", "Size": "1024x1024",
                               "Model": "juggernautXL", "RNG": "CPU"}
    assert "schedule type (not recorded by InvokeAI)" in tool.not_mapped
    assert "InvokeAI's prompt weights (word+, (words)1.2) are kept as written" in tool.not_mapped
    assert any(line.startswith("ipAdapters: ") for line in tool.not_mapped)
    assert "vae: {'model_name': 'VAEFix', 'base_model': 'sdxl'}" in tool.not_mapped


def test_invokeai_karras_variants_and_clip_skip():
    tool = read({"invokeai_metadata": json.dumps({**INVOKEAI_METADATA, "scheduler": "dpmpp_2m_k", "clip_skip": 1})})
    params = params_of(tool)
    assert params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras" and params["Clip skip"] == "2"


def test_invokeai_2_sd_metadata_maps():
    tool = read({"sd-metadata": json.dumps(INVOKEAI_SD_METADATA)})
    assert tool.prompt == "full body photo of a young woman" and tool.negative_prompt == "rendering, glowing eyes"
    assert params_of(tool) == {"Steps": "50", "Sampler": "LMS", "CFG scale": "5", "Seed": "2980747362", "Size": "512x768",
                               "Model": "deliberateForInvoke_v08"}
    assert "postprocessing: [{'type': 'esrgan', 'scale': 4, 'strength': 0.95}]" in tool.not_mapped


def test_novelai_maps_with_the_picture_size(ctx):
    tool = read(NOVELAI_CHUNKS, size=(64, 96))
    assert tool.tool == "NovelAI"
    assert params_of(tool) == {"Steps": "50", "Sampler": "Euler a", "CFG scale": "10", "Seed": "2253955223", "Size": "64x96"}
    assert "model Stable Diffusion 1D44365E (NovelAI's own)" in tool.not_mapped
    assert "schedule type (not recorded by NovelAI)" in tool.not_mapped and "strength: 0.4" in tool.not_mapped
    values = field_values(ctx, tool.infotext, {name: name for name in FIELDS})
    assert values["negative_prompt"] == "lowres, bad anatomy, bad hands" and values["sampler_name"] == "Euler a"


def test_novelai_newer_comment_gives_size_and_schedule():
    comment = {**json.loads(NOVELAI_CHUNKS["Comment"]), "width": 832, "height": 1216, "noise_schedule": "karras",
               "request_type": "PromptGenerateRequest", "sampler": "k_dpmpp_2s_ancestral", "uncond_scale": 1.0}
    tool = read({**NOVELAI_CHUNKS, "Description": "{{masterpiece}}, 1girl", "Comment": json.dumps(comment)})
    params = params_of(tool)
    assert params["Size"] == "832x1216" and params["Schedule type"] == "Karras" and params["Sampler"] == "DPM++ 2S a"
    assert "NovelAI's {emphasis} and [de-emphasis] in the prompt are kept as written" in tool.not_mapped
    assert not any(line.startswith(("strength", "uncond_scale", "request_type")) for line in tool.not_mapped)


def test_a1111_pictures_are_not_other_tools(post):
    assert read({"parameters": A1111_TEXT}) is None
    # A dynamic-prompts prompt starts with a brace and is still A1111's text.
    assert read({"parameters": "{red|blue} fox\nSteps: 20, Sampler: Euler, CFG scale: 7"}) is None
    # Savers that write A1111's text beside ComfyUI's graph mean their text to be read.
    assert read({"parameters": A1111_TEXT, **comfyui_chunks(COMFYUI_GRAPH)}) is None
    assert read({"prompt": "a plain prompt, no graph"}) is None
    body = post(png_with({"parameters": A1111_TEXT, "Software": "test"})).json()
    prompt, negative, params = parse_infotext(A1111_TEXT)
    assert body == {"info": A1111_TEXT, "items": {"Software": "test"},
                    "parameters": {"Prompt": prompt, "Negative prompt": negative, **params},
                    "tool": None, "not_mapped": [], "error": None}


@pytest.mark.parametrize("chunks, tool, words", [
    ({"prompt": "{\"3\": {\"inputs\": ", "workflow": "{}"}, "ComfyUI", 'its "prompt" text is not valid JSON'),
    ({"workflow": "{}"}, "ComfyUI", 'not the "prompt" graph that ran'),
    ({"prompt": '{"3": 5}', "workflow": "{}"}, "ComfyUI", "not a graph of nodes"),
    ({"parameters": '{"prompt": "a cat", ', "fooocus_scheme": "fooocus"}, "Fooocus", 'its "parameters" text is not valid JSON'),
    ({"parameters": "[1, 2]", "fooocus_scheme": "fooocus"}, "Fooocus", "JSON but not an object"),
    ({"parameters": '{"prompt": "a cat"}'}, "Fooocus", "error reading parameter value (missing 'base_model')"),
    ({"invokeai_metadata": "{oops"}, "InvokeAI", 'its "invokeai_metadata" text is not valid JSON'),
    ({"Software": "NovelAI", "Comment": "not json"}, "NovelAI", 'its "Comment" text is not valid JSON'),
])
def test_broken_data_gives_a_clear_message_and_no_5xx(post, chunks, tool, words):
    found = read(chunks)
    assert found.tool == tool and found.error.startswith(f"The {tool} parameters in this picture cannot be read: ")
    assert words in found.error and found.infotext == ""
    shown = info_html(read_bytes(png_with(chunks))[1], found)
    assert f"Made with {tool}" in shown and "cannot be read" in shown
    response = post(png_with(chunks))
    assert response.status_code == 200
    body = response.json()
    assert body["tool"] == tool and words in body["error"] and body["info"] == "" and body["parameters"] == {}


def test_odd_values_in_a_graph_are_listed_never_raised():
    graph = {"3": {"class_type": "KSampler", "inputs": {"sampler_name": ["9", 0], "steps": "many", "cfg": None, "seed": -5,
                                                        "scheduler": 7, "positive": ["6", 0], "latent_image": ["9", 0]}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"text": ["9", 0]}},
             "9": {"class_type": "PrimitiveNode", "inputs": {}}}
    tool = read({"prompt": json.dumps(graph)})
    assert tool.error is None
    assert "Steps many (not a number)" in tool.not_mapped
    assert "seed -5 (outside 0 to 4294967295, the seeds this web UI takes)" in tool.not_mapped


def test_png_info_shows_the_tool_the_mapping_and_the_raw_text():
    chunks = comfyui_chunks(COMFYUI_TWO_PASSES)
    image, info = read_bytes(png_with(chunks))
    shown = info_html(info, other_tools.read(info, image.size))
    assert "Made with ComfyUI" in shown and "<b>not mapped</b>" in shown and "2 samplers in one graph" in shown
    assert shown.index("not mapped") < shown.index("<b>prompt</b>") < shown.index("<b>workflow</b>")
    image, info = read_bytes(png_with({"parameters": json.dumps(FOOOCUS_PARAMETERS)}))
    shown = info_html(info, other_tools.read(info, image.size))
    assert shown.index("<b>parameters</b>") < shown.index("<b>parameters (Fooocus)</b>")
    assert "Steps: 30, Sampler: DPM++ 2M SDE" in shown


def test_tables_name_samplers_and_schedules_of_this_web_ui():
    tables = [other_tools.COMFYUI_SAMPLERS, other_tools.K_SAMPLERS, other_tools.INVOKEAI_SAMPLERS]
    for name in {a1111 for table in tables for a1111 in table.values()}:
        assert find_sampler(name).name == name
    for name in {*other_tools.COMFYUI_SCHEDULES.values(), *other_tools.NOVELAI_SCHEDULES.values()}:
        assert find_schedule(name).label == name
    assert other_tools.LARGEST_SEED == MAX_SEED


def test_comfyui_names_are_the_k_diffusion_functions_of_our_samplers():
    for comfy, a1111 in other_tools.COMFYUI_SAMPLERS.items():
        if comfy not in ("ddim", "uni_pc", "lcm"):  # ours are not k-diffusion's
            base = comfy.removesuffix("_gpu").removesuffix("_heun")  # the heun solver is an option of 2M SDE
            assert find_sampler(a1111).fn.__name__ == f"sample_{base}", comfy
    assert dict(find_sampler("DPM++ 2M SDE Heun").kwargs) == {"solver_type": "heun"}


def test_comfyui_schedulers_give_the_levels_of_ours():
    """ComfyUI's "normal" and "ddim_uniform", as comfy/samplers.py computes them, against our
    Uniform and DDIM on SD's noise levels."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    model = DiscreteSchedule(((1 - alphas) / alphas) ** 0.5, quantize=False)
    steps = 20
    timesteps = torch.linspace(float(model.sigma_to_t(model.sigma_max)), float(model.sigma_to_t(model.sigma_min)), steps)
    normal = torch.cat([model.t_to_sigma(timesteps), torch.zeros(1)])
    stride = len(model.sigmas) // steps
    ddim_uniform = [float(model.sigmas[x]) for x in range(1, len(model.sigmas), stride)][::-1] + [0.0]
    uniform = find_schedule("Uniform").fn(steps, float(model.sigma_min), float(model.sigma_max), model)
    ddim = find_schedule("DDIM").fn(steps, float(model.sigma_min), float(model.sigma_max), model)
    torch.testing.assert_close(uniform.double(), normal.double())
    torch.testing.assert_close(ddim.double(), torch.tensor(ddim_uniform, dtype=torch.float64))
