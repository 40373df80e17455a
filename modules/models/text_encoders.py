"""The CLIP text encoder of Stable Diffusion 1.x, as transformers' CLIPTextModel.

Keys live under `cond_stage_model.transformer.text_model.*` as in the original checkpoints. Recent
transformers versions keep CLIPTextModel's layers at its top level (no `text_model` inside), so
`transformer` is a thin holder that puts the CLIPTextModel at `text_model`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

# Many SD1 checkpoints carry this buffer (saved by older transformers versions, sometimes with
# corrupted float values); the model rebuilds it itself, so a stored copy is ignored on load.
POSITION_IDS_KEY = "transformer.text_model.embeddings.position_ids"


class ClipTransformer(nn.Module):
    def __init__(self, text_model: CLIPTextModel):
        super().__init__()
        self.text_model = text_model

    @property
    def config(self) -> CLIPTextConfig:
        return self.text_model.config

    def forward(self, *args, **kwargs):
        return self.text_model(*args, **kwargs)


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
        self.register_load_state_dict_pre_hook(_drop_stored_position_ids)

    @property
    def hidden_size(self) -> int:
        return self.transformer.config.hidden_size

    def forward(self, tokens: torch.Tensor, clip_skip: int = 1,
                replace: Sequence[tuple[int, int, torch.Tensor]] = ()) -> torch.Tensor:
        """tokens [B, 77] -> [B, 77, hidden]: the output of layer -clip_skip, passed through the
        final layer norm (clip_skip=1 is the last layer).

        `replace` holds (row, position, vectors [n, hidden]): those vectors take the place of the
        token embeddings of tokens[row, position:position + n] (textual-inversion embeddings).
        The layers are run here rather than through CLIPTextModel.forward, which takes only
        token ids, and only as many as clip_skip needs."""
        text_model = self.transformer.text_model
        layers = text_model.encoder.layers
        if not 1 <= clip_skip <= len(layers):
            raise ValueError(f"clip_skip must be between 1 and {len(layers)}, got {clip_skip}")
        embeds = text_model.embeddings.token_embedding(tokens)
        for row, position, vectors in replace:
            embeds[row, position:position + vectors.shape[0]] = vectors.to(embeds.device, embeds.dtype)
        hidden = text_model.embeddings(inputs_embeds=embeds)
        n = tokens.shape[1]
        causal = torch.full((n, n), float("-inf"), device=hidden.device, dtype=hidden.dtype).triu(1)[None, None]
        for layer in layers[:len(layers) - clip_skip + 1]:
            hidden = layer(hidden, causal)
        return text_model.final_layer_norm(hidden)


def _drop_stored_position_ids(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    state_dict.pop(prefix + POSITION_IDS_KEY, None)
