"""Two threads running MiT at once give the single-thread results, bit for bit: two models, or one model with two
batches, for forward, generate (greedy and beam search) and gradient-checkpointed backward.

The embedding reaches every infused layer through the call itself (kwargs, and a per-thread binding from a decoder
layer to its MLP: docs/integration.md, "How the embedding travels"), so concurrent calls cannot see each other's
embedding: no module attribute changes during a forward (checked from inside one), and the mask analyses belong to
the call. Each round starts both threads together (a barrier) so that their forwards overlap; torch ops release the
GIL, so the threads interleave inside every layer.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import integration_families as fam
import pytest
import torch

import mit
from mit.integrations import attention

ROUNDS = 20
# one family whose MLP runs the fused SwiGLU gate (and whose attention runs fused), one whose MLP scales down_proj's
# input through a pre-hook (and whose sliding / full-attention layers get two different 4-D masks)
MLP_KINDS = ["llama", "gemma3_text"]


def mit_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    model = mit.apply_mit(fam.model(model_type, **overrides), mit.MiTConfig(modality_dim=fam.MODALITY_DIM))
    fam.randomise(model, seed=seed)
    return model


def other_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A second (3, SEQ_LEN) batch with other tokens and other left padding than ``fam.padded_batch()``."""
    ids, _ = fam.padded_batch(seed)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


def in_thread(job: Callable[[], object]) -> object:
    """``job()`` run alone in a fresh thread (the reference: same thread kind as the concurrent runs)."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(job()))
    thread.start()
    thread.join(timeout=300)
    assert result, "the reference run did not finish"
    return result[0]


def run_together(jobs: list[Callable[[], object]], rounds: int = ROUNDS) -> list[str]:
    """Run each job in its own thread ``rounds`` times, the threads starting each round together; compare every
    result with the job's result alone (bitwise). Returns the failures (mismatches, exceptions)."""
    expected = [in_thread(job) for job in jobs]
    barrier = threading.Barrier(len(jobs))
    failures: list[str] = []

    def worker(index: int) -> None:
        try:
            for round_ in range(rounds):
                barrier.wait(timeout=120)
                got = jobs[index]()
                if not all(torch.equal(a, b) for a, b in zip(got, expected[index], strict=True)):
                    failures.append(f"job {index}, round {round_}: differs from the single-thread result")
        except threading.BrokenBarrierError:
            failures.append(f"job {index}: stopped (the other thread failed)")
        except Exception as error:  # reported as a test failure, with the other thread released
            failures.append(f"job {index}: {type(error).__name__}: {error}")
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    return failures


def forward_job(model, ids, mask, emb) -> Callable[[], list[torch.Tensor]]:
    def job() -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(ids, attention_mask=mask, modality_embedding=emb).logits]

    return job


def generate_job(model, ids, mask, emb, **kwargs) -> Callable[[], list[torch.Tensor]]:
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "eos_token_id": None} | kwargs
    return lambda: [model.generate(ids, attention_mask=mask, modality_embedding=emb, **kwargs)]


def test_two_models_forward_concurrently():
    """Two models of different families (fused MLP / down_proj pre-hook; other embeddings and maps)."""
    first, second = mit_model("llama", seed=1), mit_model("gemma3_text", seed=2)
    ids, mask = fam.padded_batch()
    ids2, mask2 = other_batch(3)
    jobs = [forward_job(first, ids, mask, fam.embedding(seed=4)), forward_job(second, ids2, mask2, fam.embedding())]
    assert run_together(jobs) == []


@pytest.mark.parametrize("model_type", MLP_KINDS)
def test_one_model_two_batches_forward_concurrently(model_type):
    """One model, two batches with other tokens, padding and embeddings: each thread gets its own batch's result."""
    model = mit_model(model_type)
    ids, mask = fam.padded_batch()
    ids2, mask2 = other_batch(3)
    emb, emb2 = fam.embedding(seed=1), fam.embedding(seed=2)
    jobs = [forward_job(model, ids, mask, emb), forward_job(model, ids2, mask2, emb2)]
    assert not torch.equal(jobs[0]()[0], forward_job(model, ids, mask, emb2)()[0]), "the embedding must matter"
    assert run_together(jobs) == []


@pytest.mark.parametrize("model_type", MLP_KINDS)
def test_one_model_two_batches_generate_concurrently(model_type):
    """Greedy in one thread and beam search (which expands the embedding) in the other, on the same model."""
    model = mit_model(model_type)
    ids, mask = fam.padded_batch()
    ids2, mask2 = other_batch(3)
    jobs = [
        generate_job(model, ids, mask, fam.embedding(seed=1)),
        generate_job(model, ids2, mask2, fam.embedding(seed=2), num_beams=2),
    ]
    assert run_together(jobs, rounds=8) == []


def test_two_models_generate_concurrently():
    first, second = mit_model("llama", seed=1), mit_model("gemma3_text", seed=2)
    ids, mask = fam.padded_batch()
    jobs = [generate_job(first, ids, mask, fam.embedding(seed=1)), generate_job(second, ids, mask, fam.embedding())]
    assert run_together(jobs, rounds=8) == []


@pytest.mark.parametrize("model_type", MLP_KINDS)
def test_one_model_two_batches_checkpointed_gradients_concurrently(model_type):
    """Training with gradient checkpointing (the layers run again in backward) on one model from two threads: the
    loss and the gradients of the MiT parameters and of the embedding equal each batch's single-thread ones."""
    model = copy.deepcopy(mit_model(model_type)).train()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.24 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p.requires_grad_() for _, p in model.mit_named_parameters()]

    def gradient_job(ids, mask, emb) -> Callable[[], list[torch.Tensor]]:
        def job() -> list[torch.Tensor]:
            leaf = emb.clone().requires_grad_()
            loss = model(ids, attention_mask=mask, modality_embedding=leaf, labels=ids, use_cache=False).loss
            return [loss.detach(), *torch.autograd.grad(loss, [*params, leaf])]

        return job

    ids, mask = fam.padded_batch()
    ids2, mask2 = other_batch(3)
    jobs = [gradient_job(ids, mask, fam.embedding(seed=1)), gradient_job(ids2, mask2, fam.embedding(seed=2))]
    assert run_together(jobs, rounds=8) == []


DIAGNOSTICS = {"last_dispatch", "dispatch_counts"}  # the dispatch record, written by every call, read by nothing


def module_attributes(model: torch.nn.Module) -> dict[str, dict[str, object]]:
    """Every module's instance attributes (the objects themselves), without the dispatch diagnostics."""
    return {name: {k: v for k, v in vars(m).items() if k not in DIAGNOSTICS} for name, m in model.named_modules()}


@pytest.mark.parametrize("model_type", MLP_KINDS)
def test_no_module_attribute_changes_during_a_forward(model_type):
    """Seen from inside the forward (at every infused MLP's down_proj, the deepest point the embedding reaches), every
    module holds exactly the attributes it held before the call: nothing carries the embedding but the call."""
    model = mit_model(model_type)
    seen: list[str] = []

    def compare(module, args) -> None:
        now = module_attributes(model)
        for name, attributes in before.items():
            if now[name].keys() != attributes.keys() or any(now[name][k] is not v for k, v in attributes.items()):
                seen.append(name)

    for layer in model.model.layers[1:]:
        layer.mlp.down_proj.register_forward_pre_hook(compare)
    before = module_attributes(model)
    ids, mask = fam.padded_batch()
    with torch.no_grad():
        model(ids, attention_mask=mask, modality_embedding=fam.embedding())
        model.generate(ids, attention_mask=mask, modality_embedding=fam.embedding(), max_new_tokens=2, do_sample=False)
    assert seen == []
    assert model.model.layers[1].mlp.mit_ffn_infusion.dispatch_counts, "the hooks ran inside infused MLPs"


def test_mask_analyses_belong_to_the_call(monkeypatch):
    """Gemma3's sliding and full-attention layers get two 4-D masks: each call analyses each mask once (however many
    layers read it), and the next call analyses its own masks again (nothing is kept between calls)."""
    model = mit_model("gemma3_text")
    calls: list[tuple[int, ...]] = []
    analyse = attention.key_padding_mask

    def counting(mask: torch.Tensor, batch: int, lq: int, lk: int) -> torch.Tensor | None:
        calls.append(tuple(mask.shape))
        return analyse(mask, batch, lq, lk)

    monkeypatch.setattr(attention, "key_padding_mask", counting)
    ids, mask = fam.padded_batch()
    with torch.no_grad():
        for expected in (2, 4):
            model(ids, attention_mask=mask, modality_embedding=fam.embedding())
            assert len(calls) == expected, calls
