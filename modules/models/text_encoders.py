"""The text encoders of the Stable Diffusion families, keyed as the original checkpoints keep them.

- `CLIPTextEncoder`: OpenAI's CLIP ViT-L as transformers' CLIPTextModel, keys `transformer.text_model.*`
  (SD 1.x under `cond_stage_model.`, SDXL's first encoder under `conditioner.embedders.0.`).
- `OpenCLIPTextEncoder`: an OpenCLIP text tower (ViT-H/14 for SD 2.x, ViT-bigG/14 for SDXL) in
  open_clip's own layout, keys `model.*` (`token_embedding`, `positional_embedding`,
  `transformer.resblocks.N.{ln_1,attn,ln_2,mlp}`, `ln_final`, `text_projection`, `logit_scale`).
  It is a module of our own with open_clip's attribute paths, so loading needs no renaming and
  importing open_clip (and timm behind it) is not needed at start; tests compare it with open_clip.

Both take the same chunk rows (BOS, 75 tokens, EOS, padded with CLIP's end token, as
modules.prompting.conditioning builds them) and return the hidden states of one layer. How each
family reads them is in the encoder's settings: the layer (`clip_skip` counts back from the last,
never fewer than `min_skip`), whether the final layer norm follows, the padding token the
encoder was trained with (OpenCLIP's tokenizer pads with 0), and whether a pooled vector is made.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from modules.prompting.tokenizer import EOS_ID

# Many SD1 checkpoints carry this buffer (saved by older transformers versions, sometimes with
# corrupted float values); the model rebuilds it itself, so a stored copy is ignored on load.
POSITION_IDS_KEY = "transformer.text_model.embeddings.position_ids"

# (row, position, vectors [n, width]): vectors that take the place of token embeddings.
Replacement = tuple[int, int, torch.Tensor]


class ClipTransformer(nn.Module):
    """Recent transformers versions keep CLIPTextModel's layers at its top level (no `text_model`
    inside), so this thin holder puts the CLIPTextModel at `text_model`, where the files have it."""

    def __init__(self, text_model: CLIPTextModel):
        super().__init__()
        self.text_model = text_model

    @property
    def config(self) -> CLIPTextConfig:
        return self.text_model.config

    def forward(self, *args, **kwargs):
        return self.text_model(*args, **kwargs)


def _causal_mask(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((n, n), float("-inf"), device=like.device, dtype=like.dtype).triu(1)


def _layer_count(clip_skip: int, min_skip: int, layers: int) -> int:
    """How many layers to run for `clip_skip` (1: all of them)."""
    if not 1 <= clip_skip <= layers:
        raise ValueError(f"clip_skip must be between 1 and {layers}, got {clip_skip}")
    return layers - max(clip_skip, min_skip) + 1


def _put(embeds: torch.Tensor, replace: Sequence[Replacement]) -> torch.Tensor:
    for row, position, vectors in replace:
        embeds[row, position:position + vectors.shape[0]] = vectors.to(embeds.device, embeds.dtype)
    return embeds


class CLIPTextEncoder(nn.Module):
    def __init__(
        self,
        config: CLIPTextConfig | None = None,
        *,
        vocab_size: int = 49408,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        max_position_embeddings: int = 77,
        hidden_act: str = "quick_gelu",
        min_skip: int = 1,
        final_norm: bool = True,
    ):
        super().__init__()
        if config is None:
            config = CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=hidden_size,
                intermediate_size=intermediate_size,
                num_hidden_layers=num_hidden_layers,
                num_attention_heads=num_attention_heads,
                max_position_embeddings=max_position_embeddings,
                hidden_act=hidden_act,
            )
        self.transformer = ClipTransformer(CLIPTextModel(config))
        self.min_skip = min_skip
        self.final_norm = final_norm
        self.register_load_state_dict_pre_hook(_drop_stored_position_ids)

    @property
    def hidden_size(self) -> int:
        return self.transformer.config.hidden_size

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.text_model.embeddings.token_embedding

    def forward(self, tokens: torch.Tensor, clip_skip: int = 1, replace: Sequence[Replacement] = ()) -> torch.Tensor:
        """tokens [B, 77] -> [B, 77, hidden]: the output of layer -clip_skip (1: the last), through
        the final layer norm when the family conditions on it. `replace` puts vectors in place of
        token embeddings (textual-inversion embeddings). The layers are run here rather than
        through CLIPTextModel.forward, which takes only token ids, and only as many as needed."""
        text_model = self.transformer.text_model
        layers = text_model.encoder.layers
        count = _layer_count(clip_skip, self.min_skip, len(layers))
        hidden = text_model.embeddings(inputs_embeds=_put(self.token_embedding(tokens), replace))
        causal = _causal_mask(tokens.shape[1], hidden)[None, None]
        for layer in layers[:count]:
            hidden = layer(hidden, causal)
        return text_model.final_layer_norm(hidden) if self.final_norm else hidden


def _drop_stored_position_ids(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    state_dict.pop(prefix + POSITION_IDS_KEY, None)


class OpenCLIPBlock(nn.Module):
    """open_clip's ResidualAttentionBlock: pre-norm self-attention and a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(OpenCLIPBlock(width, heads) for _ in range(layers))


class OpenCLIPTextModel(nn.Module):
    """The text half of open_clip's CLIP model, with its attribute names."""

    def __init__(self, width: int, layers: int, heads: int, embed_dim: int, vocab_size: int = 49408, context_length: int = 77):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = OpenCLIPTransformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        # Unused for text conditioning, but part of the checkpoints (CLIP's contrastive temperature).
        self.logit_scale = nn.Parameter(torch.empty(()))


class OpenCLIPTextEncoder(nn.Module):
    def __init__(
        self,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        embed_dim: int = 1024,
        vocab_size: int = 49408,
        context_length: int = 77,
        min_skip: int = 2,
        final_norm: bool = True,
        pad_id: int = 0,
    ):
        super().__init__()
        self.model = OpenCLIPTextModel(width, layers, heads, embed_dim, vocab_size, context_length)
        self.min_skip = min_skip
        self.final_norm = final_norm
        self.pad_id = pad_id

    @property
    def hidden_size(self) -> int:
        return self.model.ln_final.normalized_shape[0]

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    def padded(self, tokens: torch.Tensor) -> torch.Tensor:
        """The rows as this encoder was trained on them: every position after the first end token
        holds the padding token."""
        if self.pad_id == EOS_ID:
            return tokens
        ends = (tokens == EOS_ID).int()
        return tokens.masked_fill(ends.cumsum(dim=1) - ends > 0, self.pad_id)

    def forward(self, tokens: torch.Tensor, clip_skip: int = 1, replace: Sequence[Replacement] = (),
                pooled: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, 77] -> hidden [B, 77, width] of layer -max(clip_skip, min_skip); with
        `pooled`, also the pooled vector [B, embed_dim]: the last layer's output after the final
        norm at the (first) end token, through `text_projection`, as open_clip's encode_text."""
        model = self.model
        tokens = self.padded(tokens)
        blocks = model.transformer.resblocks
        count = _layer_count(clip_skip, self.min_skip, len(blocks))
        x = _put(model.token_embedding(tokens), replace) + model.positional_embedding.to(model.token_embedding.weight.dtype)
        mask = _causal_mask(tokens.shape[1], x)
        hidden = None
        for i, block in enumerate(blocks[:len(blocks) if pooled else count]):
            x = block(x, mask)
            if i == count - 1:
                hidden = model.ln_final(x) if self.final_norm else x
        if not pooled:
            return hidden
        ends = tokens.argmax(dim=-1)
        vector = model.ln_final(x)[torch.arange(x.shape[0], device=x.device), ends] @ model.text_projection
        return hidden, vector


# The encoder classes by the `kind` of a family's TextEncoderSpec (see modules.models.detect).
ENCODERS: dict[str, type[nn.Module]] = {"clip": CLIPTextEncoder, "openclip": OpenCLIPTextEncoder}
