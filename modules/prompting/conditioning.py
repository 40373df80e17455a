"""Prompts -> the text-encoder tensors the denoiser is conditioned on, the A1111 way.

For each prompt (and each AND part of it, and each negative prompt):

1. `prompt_parser.get_prompt_schedule` gives the text at each step (editing, alternation).
2. Each text is split into weighted fragments (`parse_prompt_attention`), tokenized, and
   packed into chunks of 75 tokens (`prompt_chunks`); BOS + 75 + EOS = the 77 positions CLIP
   takes. A chunk that fills up in the middle of a phrase moves the words after the last comma
   (if within `comma_backtrack` tokens) to the next chunk; BREAK starts a new chunk.
3. Every chunk goes through the text encoder on its own; a text's chunks are concatenated,
   so a 100-token prompt gives [154, hidden].
4. Weights scale the encoder's output per token, after which the mean is put back to what it
   was ("emphasis", A1111's Original mode). As in A1111, the mean is taken per chunk position
   over all the texts of one prompt's schedule, which are encoded together.
5. All tensors of the call (cond and uncond, all steps) are brought to the same length by
   appending encoded empty-prompt chunks, so the denoiser can batch them.

Identical prompts and identical chunks are encoded once per call. Textual-inversion embeddings
enter in step 2: where a table (modules.embeddings.EmbeddingTable) finds an embedding's name in
the tokens, its n vectors take n positions, all in one chunk (a chunk without room for them
is closed first), and the text encoder is handed the vectors for those positions. LoRA changes
weights, not this module.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from modules.prompting import prompt_parser
from modules.prompting.tokenizer import BOS_ID, EOS_ID, clip_tokenizer, tokenize

CHUNK_TOKENS = 75
CONTEXT_TOKENS = CHUNK_TOKENS + 2
COMMA_BACKTRACK = 20  # A1111's default "Prompt word wrap length limit"
PAD_ID = EOS_ID  # SD 1.x pads with the end token
PLACEHOLDER_ID = 0  # stands where an embedding's vectors go; the encoder never sees its own vector
ENCODE_BATCH = 32  # chunks per text-encoder call


@dataclass(frozen=True)
class Chunk:
    """One 77-token encoder input: BOS, 75 prompt or padding tokens, EOS; a weight per token;
    `fixes` (position, embedding): the embedding's vectors replace tokens from that position on."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    fixes: tuple[tuple[int, Any], ...] = ()

    @property
    def key(self) -> tuple:
        """What identifies the encoder's output for this chunk (embeddings compare by identity)."""
        return self.tokens, tuple((position, id(embedding)) for position, embedding in self.fixes)


EMPTY_CHUNK = Chunk((BOS_ID,) + (PAD_ID,) * (CONTEXT_TOKENS - 1), (1.0,) * CONTEXT_TOKENS)


@dataclass(frozen=True, eq=False)
class ScheduledCond:
    """A prompt's conditioning over the steps: entries (end_at_step, Tensor[tokens, hidden]) in
    increasing step order; each tensor is used up to and including its end step. Models with a
    vector input (SDXL) also get `vectors`, one per entry: the pooled text and size conditioning."""

    entries: tuple[tuple[int, torch.Tensor], ...]
    vectors: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self):
        entries = tuple((int(end), tensor) for end, tensor in self.entries)
        if not entries:
            raise ValueError("ScheduledCond needs at least one entry")
        if any(a[0] >= b[0] for a, b in zip(entries, entries[1:])):
            raise ValueError(f"ScheduledCond end steps must increase: {[e for e, _ in entries]}")
        if self.vectors is not None and len(self.vectors) != len(entries):
            raise ValueError(f"ScheduledCond has {len(entries)} entries but {len(self.vectors)} vectors")
        object.__setattr__(self, "entries", entries)

    def _index(self, step: int) -> int:
        """The first entry whose end_at_step >= step (the last one after the schedule's end)."""
        return next((i for i, (end, _tensor) in enumerate(self.entries) if step <= end), len(self.entries) - 1)

    def at(self, step: int) -> torch.Tensor:
        """The context tensor for `step`."""
        return self.entries[self._index(step)][1]

    def vector_at(self, step: int) -> torch.Tensor | None:
        """The vector input for `step`, or None for models without one."""
        return None if self.vectors is None else self.vectors[self._index(step)]

    @property
    def shape(self) -> torch.Size:
        return self.entries[0][1].shape


@dataclass
class Conditioning:
    """Per image in the batch: the AND parts of its prompt with their weights, and the
    conditioning of its negative prompt. All tensors have the same shape."""

    cond: list[list[tuple[ScheduledCond, float]]]
    uncond: list[ScheduledCond]


# ----------------------------------------------------------------------------------------------
# Text -> chunks (no model needed)


@dataclass
class _ChunkBuilder:
    """Packs weighted tokens into chunks with A1111's rules; `token_count` counts a chunk
    closed early (full or by BREAK) as 75 and the last one by what it holds."""

    comma_id: int
    comma_backtrack: int
    chunks: list[Chunk] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Any]] = field(default_factory=list)  # (index in `tokens`, embedding)
    last_comma: int = -1  # index in `tokens` of the chunk's last comma
    token_count: int = 0

    def _make_room(self, token: int) -> None:
        """Before `token` goes in: note a comma, and move on to the next chunk if this one is full."""
        if token == self.comma_id:
            self.last_comma = len(self.tokens)
        elif (
            len(self.tokens) == CHUNK_TOKENS
            and self.last_comma != -1
            and CHUNK_TOKENS - self.last_comma <= self.comma_backtrack
        ):
            # Full in mid-phrase: the words after the last comma start the next chunk, and so
            # do the embeddings among them (A1111 leaves those behind, at padding positions).
            split = self.last_comma + 1
            moved = self.tokens[split:], self.weights[split:], [(i - split, e) for i, e in self.fixes if i >= split]
            del self.tokens[split:], self.weights[split:]
            self.fixes = [(i, e) for i, e in self.fixes if i < split]
            self.close()
            self.tokens, self.weights, self.fixes = list(moved[0]), list(moved[1]), moved[2]
        if len(self.tokens) == CHUNK_TOKENS:
            self.close()

    def add(self, token: int, weight: float) -> None:
        self._make_room(token)
        self.tokens.append(token)
        self.weights.append(weight)

    def add_embedding(self, embedding, weight: float) -> None:
        """An embedding's vectors as one unit: a chunk without room for all of them is closed.
        (Never a comma, so that backtracking cannot split it.)"""
        self._make_room(PLACEHOLDER_ID)
        if len(self.tokens) + embedding.count > CHUNK_TOKENS:
            self.close()
        self.fixes.append((len(self.tokens), embedding))
        self.tokens.extend([PLACEHOLDER_ID] * embedding.count)
        self.weights.extend([weight] * embedding.count)

    def close(self, last: bool = False) -> None:
        self.token_count += len(self.tokens) if last else CHUNK_TOKENS
        padding = CHUNK_TOKENS - len(self.tokens)
        self.chunks.append(Chunk(
            (BOS_ID, *self.tokens, *(PAD_ID,) * padding, EOS_ID),
            (1.0, *self.weights, *(1.0,) * padding, 1.0),
            tuple((1 + i, embedding) for i, embedding in self.fixes),  # 1 + : after BOS
        ))
        self.tokens, self.weights, self.fixes, self.last_comma = [], [], [], -1

    def finish(self) -> list[Chunk]:
        if self.tokens or not self.chunks:
            self.close(last=True)
        return self.chunks


def _comma_id() -> int:
    return clip_tokenizer().convert_tokens_to_ids(",</w>")


def prompt_chunks(text: str, comma_backtrack: int = COMMA_BACKTRACK, embeddings=None) -> tuple[list[Chunk], int]:
    """(chunks, token count) of one prompt text after editing (attention syntax and BREAK in it).
    `embeddings` (an EmbeddingTable) finds embedding names; each vector counts as a token."""
    fragments = prompt_parser.parse_prompt_attention(text)
    words = [t for t, w in fragments if (t, w) != prompt_parser.BREAK_MARKER]
    token_lists = iter(tokenize(words))
    builder = _ChunkBuilder(_comma_id(), comma_backtrack)
    for fragment in fragments:
        if fragment == prompt_parser.BREAK_MARKER:
            builder.close()
            continue
        tokens, weight = next(token_lists), fragment[1]
        position = 0
        while position < len(tokens):
            found = embeddings.match(tokens, position) if embeddings is not None else None
            if found is None:
                builder.add(tokens[position], weight)
                position += 1
            else:
                builder.add_embedding(found[0], weight)
                position += found[1]
    return builder.finish(), builder.token_count


def _texts(prompt: str, steps: int, old_scheduling: bool = False) -> list[str]:
    """The distinct texts that a prompt's AND parts show over the steps."""
    return list(dict.fromkeys(
        text
        for part, _weight in prompt_parser.split_and(prompt)
        for _end, text in prompt_parser.get_prompt_schedule(part, steps, old_scheduling=old_scheduling)
    ))


def token_count(prompt: str, steps: int = 20, embeddings=None) -> int:
    """Tokens a prompt uses, for a "n/75" counter: the most over its AND parts and steps."""
    return max(prompt_chunks(text, embeddings=embeddings)[1] for text in _texts(prompt, steps))


def embeddings_used(prompts: list[str], steps: int, embeddings, *, old_scheduling: bool = False) -> list:
    """The embeddings the conditioning of these prompts puts in, in order of first use."""
    used = {}
    for prompt in dict.fromkeys(prompts):
        for text in _texts(prompt, steps, old_scheduling):
            for chunk in prompt_chunks(text, embeddings=embeddings)[0]:
                used.update((id(e), e) for _position, e in chunk.fixes)
    return list(used.values())


# ----------------------------------------------------------------------------------------------
# Chunks -> tensors


def _text_device(sd_model) -> torch.device:
    param = next(sd_model.text_model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _encode_rows(sd_model, rows: list[Chunk], clip_skip: int) -> dict[tuple, tuple[torch.Tensor, torch.Tensor | None]]:
    """Raw encoder output for each distinct chunk, by its key: ([77, hidden], pooled or None)."""
    device = _text_device(sd_model)
    out = {}
    for start in range(0, len(rows), ENCODE_BATCH):
        batch = rows[start:start + ENCODE_BATCH]
        tokens = torch.tensor([chunk.tokens for chunk in batch], dtype=torch.long, device=device)
        replace = [(row, position, embedding.vectors)
                   for row, chunk in enumerate(batch) for position, embedding in chunk.fixes]
        z, pooled = sd_model.encode_text(tokens, clip_skip, replace=replace)
        out.update(zip((chunk.key for chunk in batch), zip(z, pooled if pooled is not None else [None] * len(batch))))
    return out


def _emphasis(z: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """z [n, 77, hidden] times weights [n, 77], rescaled to keep the overall mean; row i stands
    for counts[i] identical texts (A1111 encodes the duplicates, the mean is the same)."""
    if bool((weights == 1).all()):
        return z

    def mean(x):
        return (x.float().mean(dim=(1, 2)) * counts).sum() / counts.sum()

    weighted = z * weights.to(z.dtype).unsqueeze(-1)
    return weighted * (mean(z) / mean(weighted)).to(z.dtype)


@dataclass
class _PromptPlan:
    """One (sub)prompt's schedule and the chunks of each distinct text in it."""

    schedule: list[tuple[int, str]]
    counts: Counter  # text -> how many schedule entries have it (alternation repeats texts)
    chunks: dict[str, list[Chunk]]

    @property
    def n_chunks(self) -> int:
        return max(len(c) for c in self.chunks.values())

    def group(self, position: int) -> list[tuple[Chunk, int]]:
        """The chunks at one position, a row per distinct text (the empty chunk where a text
        is shorter), with their entry counts: the rows that are normalised together."""
        return [(chunks[position] if position < len(chunks) else EMPTY_CHUNK, self.counts[text])
                for text, chunks in self.chunks.items()]


def _encode_schedules(sd_model, texts: list[str], steps: int, clip_skip: int, *, old_scheduling: bool, comma_backtrack: int,
                      embeddings) -> tuple[dict[str, list[tuple[int, torch.Tensor, torch.Tensor | None]]], torch.Tensor]:
    """For each distinct (sub)prompt: [(end_at_step, Tensor[chunks*77, hidden], pooled)], the
    pooled vector (or None) being the first chunk's, unweighted, as in A1111; and the encoded
    empty chunk, for padding."""
    chunk_cache: dict[str, list[Chunk]] = {}
    plans = {}
    for prompt in texts:
        schedule = prompt_parser.get_prompt_schedule(prompt, steps, old_scheduling=old_scheduling)
        counts = Counter(text for _end, text in schedule)
        for text in counts:
            if text not in chunk_cache:
                chunk_cache[text] = prompt_chunks(text, comma_backtrack, embeddings)[0]
        plans[prompt] = _PromptPlan(schedule, counts, {text: chunk_cache[text] for text in counts})

    rows = {chunk.key: chunk for chunk in [EMPTY_CHUNK] + [chunk for plan in plans.values()
            for position in range(plan.n_chunks) for chunk, _ in plan.group(position)]}
    raw = _encode_rows(sd_model, list(rows.values()), clip_skip)

    result = {}
    for prompt, plan in plans.items():
        per_text: dict[str, list[torch.Tensor]] = {text: [] for text in plan.chunks}
        for position in range(plan.n_chunks):
            group = plan.group(position)
            z = torch.stack([raw[chunk.key][0] for chunk, _ in group])
            weights = torch.tensor([chunk.weights for chunk, _ in group], device=z.device)
            counts = torch.tensor([float(n) for _, n in group], device=z.device)
            for text, row in zip(plan.chunks, _emphasis(z, weights, counts)):
                per_text[text].append(row)
        tensors = {text: torch.cat(parts) for text, parts in per_text.items()}
        result[prompt] = [(end, tensors[text], raw[plan.chunks[text][0].key][1]) for end, text in plan.schedule]
    return result, raw[EMPTY_CHUNK.key][0]


def encode_prompts(sd_model, prompts: list[str], negative_prompts: list[str], steps: int, clip_skip: int, *,
                   old_scheduling: bool = False, comma_backtrack: int = COMMA_BACKTRACK, embeddings=None,
                   size: tuple[int, int] | None = None) -> Conditioning:
    """Conditioning for a batch: prompts[i] and negative_prompts[i] belong to image i.

    `sd_model` needs `encode_text(tokens [B, 77], clip_skip, replace=[(row, position, vectors)])
    -> ([B, 77, hidden], pooled [B, n] or None)`, a `text_model` (whose parameters tell the
    device) and `vector(pooled, width, height, negative)`, which gives SDXL's vector input for a
    picture of `size` (width, height) and None for models without one.
    `old_scheduling` selects A1111's pre-1.6 reading of editing steps (see prompt_parser).
    `embeddings` (an EmbeddingTable) puts textual-inversion vectors where their names are.
    Negative prompts are not split at AND, as in A1111. Raises PromptError for a prompt with an
    unreadable attention weight."""
    if len(prompts) != len(negative_prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    if not prompts:
        return Conditioning(cond=[], uncond=[])
    parts = [prompt_parser.split_and(p) for p in prompts]
    texts = list(dict.fromkeys([t for image in parts for t, _ in image] + list(negative_prompts)))
    encoded, empty = _encode_schedules(sd_model, texts, steps, clip_skip, old_scheduling=old_scheduling,
                                       comma_backtrack=comma_backtrack, embeddings=embeddings)

    longest = max(t.shape[0] for schedule in encoded.values() for _, t, _pooled in schedule)
    if any(t.shape[0] != longest for schedule in encoded.values() for _, t, _pooled in schedule):
        padded = {}  # by tensor identity: schedule entries that share a tensor keep sharing it

        def pad(t):
            if id(t) not in padded:
                extra = (longest - t.shape[0]) // CONTEXT_TOKENS
                padded[id(t)] = torch.cat([t, empty.to(t.dtype).repeat(extra, 1)]) if extra else t
            return padded[id(t)]

        encoded = {p: [(end, pad(t), pooled) for end, t, pooled in schedule] for p, schedule in encoded.items()}

    def scheduled(text: str, negative: bool) -> ScheduledCond:
        schedule = encoded[text]
        vectors = None
        if schedule[0][2] is not None:
            if size is None:
                raise ValueError("this model's conditioning needs the picture's size")
            vectors = tuple(sd_model.vector(pooled, *size, negative=negative) for _end, _t, pooled in schedule)
        return ScheduledCond([(end, t) for end, t, _pooled in schedule], vectors)

    conds = {text: scheduled(text, False) for image in parts for text, _ in image}
    unconds = {text: scheduled(text, True) for text in dict.fromkeys(negative_prompts)}
    return Conditioning(
        cond=[[(conds[text], weight) for text, weight in image] for image in parts],
        uncond=[unconds[n] for n in negative_prompts],
    )
