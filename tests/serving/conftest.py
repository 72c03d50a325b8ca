"""Fixtures of the serving tests: the real SmolLM2-135M as a vLLM-loadable checkpoint and an MiT adapter for it.

Nothing here imports vLLM (the tests that need it skip where it is not installed).
"""

import pytest
import torch

import mit

MODALITY_DIM = 16


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """(base directory, adapter directory, transformers MiT model, tokenizer): SmolLM2 with non-zero maps."""
    from mit.models import load_smollm2, smollm2_checkpoint

    base = smollm2_checkpoint()  # the directory vLLM loads
    model, tokenizer = load_smollm2()  # (read back from it)
    mit_model = mit.apply_mit(model, mit.MiTConfig(modality_dim=MODALITY_DIM))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in mit_model.mit_named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.02 if "weight" in name else 0.05))
    adapter = tmp_path_factory.mktemp("adapter")
    mit.save_adapter(mit_model, adapter)
    return base, adapter, mit_model, tokenizer


@pytest.fixture(scope="session")
def reference(served):
    """``reference(prompt_ids, embedding, new_tokens)``: greedy tokens of the transformers MiT model (the frozen base
    without an embedding), stopping at EOS as vLLM does."""
    _, _, model, _ = served

    def generate(prompt_ids: list[int], embedding: torch.Tensor | None, new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        kwargs = {} if embedding is None else {"modality_embedding": embedding[None]}
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **kwargs)
        return out[0, ids.shape[1] :].tolist()

    return generate
