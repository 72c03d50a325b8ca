"""The tuned SmolLM2 of each variant with the experiment's heads: neural tuning (image tokens, task
tokens) and MiT (one infused modality embedding per row)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mit.config import MiTConfig
from mit.integrations import apply_mit
from mit.neural import TASK_TOKENS, NeuralTuningConfig, apply_neural_tuning

from .config import GLB, LCL, NeuralDigitsConfig
from .heads import DrawHead, MaskDecoder, PatchEncoder
from .tasks import caption_text


class DigitsModel(nn.Module):
    """A frozen SmolLM2 with an adapter (``llm``; :meth:`attach` in the subclass), the demo's patch encoder and task
    heads. Rows are ``[pad, <|im_start|> (cfg.bos), image part, prompt, answer]``, left-padded."""

    adapter_marker = ""  # a substring of the adapter's parameter names (their learning rate is ``lr``)

    def __init__(self, base, tokenizer, cfg: NeuralDigitsConfig, pixel_stats) -> None:
        super().__init__()
        self.tokenizer = copy.deepcopy(tokenizer)
        self.llm = copy.deepcopy(base)
        self.attach(cfg)
        hidden = self.llm.config.hidden_size
        self.encoder = PatchEncoder(cfg.patch_dim, cfg.tokens_per_patch, *pixel_stats)
        self.encoder_pretrain_loss: list[float] = []
        self.mask_decoder = MaskDecoder(hidden, cfg.patch_dim)
        self.draw_head = DrawHead(hidden)
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id
        self.prefix = [tok.bos_token_id] if cfg.bos and tok.bos_token_id is not None else []
        self.caption_prompt = tok("Caption:").input_ids
        self.caption_answers = [[*tok(" " + caption_text(d)).input_ids, self.eos_id] for d in range(10)]
        self.draw_prompts = [tok(f"Draw a {d}").input_ids for d in range(10)]
        self.segment_prompts = [tok(f"Segment the {d}").input_ids for d in range(10)]
        self.larger_prompt = tok("Segment the larger number").input_ids

    def attach(self, cfg: NeuralDigitsConfig) -> None:
        raise NotImplementedError

    def image_inputs(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n, 64) patches -> (each row's image part, stacked (B, ...); the patch features (B, n, patch_dim))."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self, lr: float, head_lr: float) -> list[dict]:
        """AdamW groups: the adapter (names containing ``adapter_marker``) at ``lr``; everything else trainable (patch
        encoder, image projection, new tokens' rows, mask decoder, draw head) at ``head_lr``."""
        adapter, heads = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (adapter if self.adapter_marker in name else heads).append(param)
        return [{"params": adapter, "lr": lr}, {"params": heads, "lr": head_lr}]

    def layout(self, rows: list, image_lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """Token ids (B, L) with ``image_lengths[b]`` placeholder positions after the prefix, attention mask (B, L),
        padding-aware positions (B, L) and each row's padding length."""
        lead = self.prefix
        lengths = [len(lead) + n + len(p) + len(a) for (_, p, a), n in zip(rows, image_lengths)]
        width = max(lengths)
        ids = torch.full((len(rows), width), self.eos_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        pads = []
        for b, ((_, prompt, answer), n, total) in enumerate(zip(rows, image_lengths, lengths)):
            pad = width - total
            pads.append(pad)
            ids[b, pad : pad + len(lead)] = torch.tensor(lead, dtype=torch.long)
            ids[b, pad + len(lead) + n :] = torch.tensor(prompt + answer)
            mask[b, pad:] = 1
        return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0), pads

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm.get_output_embeddings()(hidden)


class NeuralDigits(DigitsModel):
    """Neural tuning: the image part of a row is its image tokens (P, patch_dim), projected by the adapter's
    ``nt_image_projection`` into the sequence; answers of segmentation / draw are the new tokens <LCL-k> / <GLB>."""

    adapter_marker = ".nt_neurons."

    def __init__(self, base, tokenizer, cfg: NeuralDigitsConfig, sparsity: float, pixel_stats) -> None:
        self.sparsity = sparsity
        super().__init__(base, tokenizer, cfg, pixel_stats)
        self.segment_answer = self.tokenizer.convert_tokens_to_ids(list(LCL))[: cfg.segment_tokens]
        self.draw_answer = [self.tokenizer.convert_tokens_to_ids(GLB)]

    def attach(self, cfg: NeuralDigitsConfig) -> None:
        config = NeuralTuningConfig(
            rank=cfg.rank, sparsity=self.sparsity, alpha=cfg.alpha, start_layer=cfg.start_layer,
            image_dim=cfg.patch_dim, new_tokens=list(TASK_TOKENS),
        )  # fmt: skip
        apply_neural_tuning(self.llm, config, self.tokenizer)

    def image_inputs(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(patches)

    def units(self) -> list[nn.Module]:
        """The adapted layers' neurons (``self_attn.nt_neurons``), in layer order."""
        return [m for m in self.llm.modules() if type(m).__name__ == "NeuralTuningLayer"]

    def run(self, rows: list[tuple[torch.Tensor | None, list[int], list[int]]]) -> tuple[torch.Tensor, list[int]]:
        """Rows of (image tokens (P, patch_dim) or None, prompt ids, answer ids) through the tuned LLM. Returns the
        final hidden states (B, L, hidden) and each row's padding length."""
        llm = self.llm
        image_lengths = [0 if im is None else im.shape[0] for im, _, _ in rows]
        ids, mask, positions, pads = self.layout(rows, image_lengths)
        is_image = torch.zeros(ids.shape, dtype=torch.bool)
        for b, (n, pad) in enumerate(zip(image_lengths, pads)):
            is_image[b, pad + len(self.prefix) : pad + len(self.prefix) + n] = True
        embeds = llm.get_input_embeddings()(ids)
        images = [im for im, _, _ in rows if im is not None]
        if images:
            projected = llm.nt_image_projection(torch.cat(images)[None], embeds.dtype)[0]
            embeds = embeds.masked_scatter(is_image[..., None], projected)
        out = llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        return out.last_hidden_state, pads


class MiTDigits(DigitsModel):
    """Multimodal Infusion Tuning: the image part of a row is one modality embedding (2 * patch_dim,): the patch
    encoder's feature of each digit, left then right (a single digit: its feature, then zeros), infused by
    :func:`mit.apply_mit` into the paper's layers (:func:`mit.config.default_layers`: 12, 16, 20, 24, 28, 29). No
    image tokens, no new tokens: a segmentation answer is empty (the condition is the last prompt token's state);
    drawing has no image and is not served."""

    adapter_marker = ".mit_"

    def __init__(self, base, tokenizer, cfg: NeuralDigitsConfig, pixel_stats) -> None:
        super().__init__(base, tokenizer, cfg, pixel_stats)
        self.segment_answer: list[int] = []

    def attach(self, cfg: NeuralDigitsConfig) -> None:
        apply_mit(self.llm, MiTConfig(modality_dim=2 * cfg.patch_dim))  # the paper's layers: 12, 16, ..., 28, 29

    def image_inputs(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, features = self.encoder(patches)  # (B, n, C)
        slots = self.encoder.position.shape[0]
        embedding = nn.functional.pad(features, (0, 0, 0, slots - features.shape[1])).flatten(1)
        return embedding, features

    def run(self, rows: list[tuple[torch.Tensor | None, list[int], list[int]]]) -> tuple[torch.Tensor, list[int]]:
        """Rows of (modality embedding (2 * patch_dim,), prompt ids, answer ids) through the MiT model (its own
        top-level forward with ``modality_embedding``; the final hidden states are read by a forward hook on the
        decoder). Returns the final hidden states (B, L, hidden) and each row's padding length."""
        if any(im is None for im, _, _ in rows):
            raise ValueError("rows: MiT needs a modality embedding for every row (it cannot serve 'draw')")
        ids, mask, positions, pads = self.layout(rows, [0] * len(rows))
        captured = {}
        handle = self.llm.model.register_forward_hook(lambda m, a, out: captured.update(hidden=out.last_hidden_state))
        try:
            self.llm(
                input_ids=ids, attention_mask=mask, position_ids=positions,
                modality_embedding=torch.stack([im for im, _, _ in rows]), logits_to_keep=1,
            )  # fmt: skip
        finally:
            handle.remove()
        return captured["hidden"], pads


def build_model(variant: str, base, tokenizer, cfg: NeuralDigitsConfig, pixel_stats) -> DigitsModel:
    if variant == "mit":
        return MiTDigits(base, tokenizer, cfg, pixel_stats)
    return NeuralDigits(base, tokenizer, cfg, 1.0 if variant == "dense" else cfg.sparsity, pixel_stats)
