"""Prompt templates of the three tasks, tokenisation, and the task embedding (last real token's hidden state).

The paper (Sec. 4, Fig. 3) formats every input with a task template ending in a marker, e.g.
``Segment the {description} according to the text. #Segmentation:``, and reads the task embedding off the last token
of the sequence (decoder-only LLM). Only the segmentation template is spelled out in the paper's text; the others
follow its pattern.
"""

from __future__ import annotations

import torch

TEMPLATES: dict[str, str] = {
    "refseg": "Segment the {description} according to the text. #Segmentation:",
    "food101": "Classify the food in the image according to the recipe title: {text}. #Category:",
    "snli_ve": "Does the image entail, contradict or not determine the hypothesis: {text}? #Relation:",
    "msa": "Analyze the sentiment of the speaker who says: {text}. #Sentiment:",
}


def format_prompt(template: str, **fields: str) -> str:
    """``template.format(**fields)`` with surrounding whitespace and a trailing period of the fields stripped."""
    if template in TEMPLATES:
        template = TEMPLATES[template]
    clean = {k: str(v).strip().rstrip(".").strip() for k, v in fields.items()}
    try:
        return template.format(**clean)
    except KeyError as error:
        raise ValueError(f"template {template!r} needs the field {error}; got fields {sorted(fields)}") from None


def tokenize_prompts(
    tokenizer, prompts: list[str], padding_side: str = "left", max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise a batch with the given padding side; returns ``(input_ids, attention_mask)`` (long tensors).

    Truncation (``max_length``) keeps the *end* of each prompt, where the task marker is."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if max_length is not None:
        encoded = [ids[-max_length:] for ids in encoded]
    length = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(encoded), length), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for i, ids in enumerate(encoded):
        if padding_side == "left":
            input_ids[i, length - len(ids) :] = torch.tensor(ids)
            mask[i, length - len(ids) :] = 1
        else:
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
    return input_ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only (0, 1, ... from each row's first real token; pads get 0).

    Needed for padding-independent results under MiT: the infused ``k_add`` is added after rotary embedding, which
    makes attention depend on absolute positions, so left padding with the default ``arange`` positions would change a
    sample's task embedding with the amount of padding in its batch (``generate()`` derives positions like this too)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (1 in the mask): ``L - 1`` under left padding, ``mask.sum(1) - 1`` under
    right padding; computed so that any padding works. A row without real tokens raises ValueError."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, L), got {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    if not real.any(dim=1).all():
        raise ValueError("every row of attention_mask needs at least one real token")
    length = real.shape[1]
    return length - 1 - real.flip(1).int().argmax(dim=1)


def last_token_state(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The task embedding: ``hidden_states[b, last_token_index(mask)[b]]``, shape (B, hidden)."""
    index = last_token_index(attention_mask).to(hidden_states.device)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), index]
