"""Neural tuning on tiny random Llama models (4 layers, 4 query / 2 KV heads of 16): each property of the method
checked against an independent computation."""

from __future__ import annotations

import contextlib
import inspect
import io
import math

import integration_families as fam
import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import mit
from mit.neural import NeuralTuningConfig, active_count, apply_neural_tuning, sparsify

# transformers 5.24 renamed past_key_values to cache (argument and output field); the test runs on both
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
RANK = 8


def nt_model(new_token_ids=None, **overrides):
    config = NeuralTuningConfig(rank=RANK, **({"start_layer": 1} | overrides))
    return apply_neural_tuning(fam.model("llama"), config, new_token_ids=new_token_ids)


def test_sparsify_keeps_r_minus_k_units_with_the_threshold_subtracted():
    z = torch.randn(3, 5, RANK, generator=torch.Generator().manual_seed(0))
    for rho in (0.4, 0.5, 1.0, 1e-6):
        k = min(max(math.floor((1 - rho) * RANK), 1), RANK)
        tau = z.sort(-1).values[..., k - 1 : k]
        out = sparsify(z, rho)
        assert active_count(RANK, rho) == RANK - k
        assert ((out > 0).sum(-1) == RANK - k).all()
        torch.testing.assert_close(out, (z - tau).clamp(min=0), rtol=0, atol=0)


def _capture(model, layers):
    """Record (H, Z^u, Z^a) of each adapted layer's neurons during the next forwards."""
    seen = {}
    for index in layers:
        neurons = model.model.layers[index].self_attn.nt_neurons

        def wrapped(h, previous, rho, _n=neurons, _i=index, _orig=neurons.neurons):
            z_u, z_a = _orig(h, previous, rho)
            seen[_i] = (h, z_u, z_a, rho)
            return z_u, z_a

        neurons.neurons = wrapped
    return seen


def test_cross_layer_average_and_inference_sparsity_match_a_hand_written_recurrence():
    model = nt_model(alpha=0.3)
    seen = _capture(model, [1, 2, 3])
    ids, mask = fam.padded_batch()
    model(ids, attention_mask=mask)
    previous = None
    for index in (1, 2, 3):
        h, z_u, z_a, rho = seen[index]
        neurons = model.model.layers[index].self_attn.nt_neurons
        z = 0.7 * (h @ neurons.z_proj.weight.T) + (0.3 * previous if previous is not None else 0)
        expected = neurons.norm_weight * z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + neurons.eps)
        torch.testing.assert_close(z_u, expected, rtol=1e-5, atol=1e-6)
        assert rho == 0.4  # eval: deterministic rho0
        real = mask.bool()  # padding rows are all-equal (zero embedding): ties
        assert ((z_a > 0).sum(-1)[real] == RANK - math.floor(0.6 * RANK)).all()
        previous = expected


def test_training_draws_rho_per_layer_around_rho0():
    model = nt_model().train()
    seen = _capture(model, [1, 2, 3])
    torch.manual_seed(0)
    model(fam.padded_batch()[0])
    rhos = [seen[i][3] for i in (1, 2, 3)]
    assert len(set(rhos)) == 3 and all(abs(r - 0.4) < 0.4 * 0.1 * 5 for r in rhos), rhos
    model.eval()
    model.neural_config.inference_jitter = True
    for i in (1, 2, 3):
        model.model.layers[i].self_attn.nt_neurons.inference_jitter = True
    model(fam.padded_batch()[0])
    assert all(seen[i][3] != 0.4 for i in (1, 2, 3))


@pytest.fixture
def capture_attention():
    """An attention implementation that records q, k, v (after rotary) and runs sdpa."""
    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = (query, key, value)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register("nt_test_capture", capture)
    AttentionMaskInterface.register("nt_test_capture", sdpa_mask)
    return captured


@pytest.mark.parametrize("targets", ["qv", "qkv"])
def test_deltas_land_before_rotary_with_gqa_shapes(capture_attention, targets):
    model = nt_model(targets=targets)
    model.config._attn_implementation = "nt_test_capture"
    seen = _capture(model, [2])
    ids = fam.padded_batch()[0]
    model(ids)
    attention = model.model.layers[2].self_attn
    neurons = attention.nt_neurons
    h, _, z_a, _ = seen[2]
    delta = z_a @ neurons.b_proj.weight.T + neurons.b_proj.bias
    hq, hkv, d = 4, 2, 16
    assert neurons.b_proj.out_features == hq * d + (2 if targets == "qkv" else 1) * hkv * d
    dq, dv = delta[..., : hq * d], delta[..., -hkv * d :]
    dk = delta[..., hq * d : (hq + hkv) * d] if targets == "qkv" else 0
    q = (torch.nn.functional.linear(h, attention.q_proj.weight) + dq).view(3, -1, hq, d).transpose(1, 2)
    k = (torch.nn.functional.linear(h, attention.k_proj.weight) + dk).view(3, -1, hkv, d).transpose(1, 2)
    v = (torch.nn.functional.linear(h, attention.v_proj.weight) + dv).view(3, -1, hkv, d).transpose(1, 2)
    positions = torch.arange(ids.shape[1])[None].expand(3, -1)
    cos, sin = model.model.rotary_emb(h, positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k, got_v = capture_attention[2]
    assert got_q.shape == (3, hq, ids.shape[1], d) and got_v.shape == (3, hkv, ids.shape[1], d)
    for got, expected in ((got_q, q), (got_k, k), (got_v, v)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_zero_init_b_is_exactly_the_base_model_logits_and_greedy_generation():
    base = fam.model("llama")
    ids, mask = fam.padded_batch()
    logits = base(ids, attention_mask=mask).logits
    generated = base.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    model = nt_model(zero_init_b=True)
    assert torch.equal(model(ids, attention_mask=mask).logits, logits)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False), generated)
    assert not torch.equal(nt_model()(ids, attention_mask=mask).logits, logits)  # default init perturbs


def test_only_neural_parameters_and_new_token_rows_train():
    model = nt_model(image_dim=12, new_tokens=["<A>", "<B>"], new_token_ids=[97, 98]).train()
    embedding = model.model.embed_tokens.weight
    old_rows = embedding[:97].clone()
    ids = torch.cat([fam.padded_batch()[0][:2, :6], torch.tensor([[97, 98], [98, 97]])], dim=1)
    out = model(ids, image_features=torch.randn(2, 3, 12), labels=ids)
    out.loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.grad is not None}
    names = {name for name, _ in model.neural_named_parameters()}
    assert trainable == names and names
    assert {n.split(".")[0] for n in names} == {"model", "nt_image_projection", "nt_new_tokens"}
    assert all(".nt_neurons." in n for n in names if n.startswith("model."))
    assert model.nt_new_tokens.head.grad.abs().sum() > 0 and model.nt_new_tokens.embedding.grad.abs().sum() > 0
    rows = model.nt_new_tokens.embedding.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    optimizer.step()
    assert torch.equal(embedding[:97], old_rows)
    assert not torch.equal(model.nt_new_tokens.embedding, rows)
    # the new tokens' logits come from the trainable rows
    hidden = model.model(ids).last_hidden_state
    torch.testing.assert_close(model(ids).logits[..., 97:99], hidden @ model.nt_new_tokens.head.T)


def test_new_tokens_are_added_to_the_tokenizer():
    class Tokenizer:
        def __init__(self):
            self.vocab = {}

        def add_tokens(self, tokens, special_tokens=False):
            for t in tokens:
                self.vocab.setdefault(t, 97 + len(self.vocab))

        def convert_tokens_to_ids(self, tokens):
            return [self.vocab[t] for t in tokens]

    tokenizer = Tokenizer()
    model = apply_neural_tuning(fam.model("llama"), NeuralTuningConfig(rank=RANK, new_tokens=["<X>"]), tokenizer)
    assert tokenizer.vocab == {"<X>": 97} and model.nt_new_token_ids == [97]
    assert model.get_input_embeddings().num_embeddings == 98
    with pytest.raises(ValueError, match="need a tokenizer"):
        apply_neural_tuning(fam.model("llama"), NeuralTuningConfig(new_tokens=["<X>"]))


def test_adapter_round_trip_gives_identical_logits(tmp_path):
    model = nt_model(image_dim=12, targets="qkv", new_tokens=["<A>"], new_token_ids=[97])
    with torch.no_grad():
        for _, p in model.neural_named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids, mask = fam.padded_batch()
    images = torch.randn(3, 2, 12)
    expected = model(ids, attention_mask=mask, image_features=images).logits
    mit.save_neural_adapter(model, tmp_path)
    fresh = mit.load_neural_adapter(fam.model("llama"), tmp_path)
    assert torch.equal(fresh(ids, attention_mask=mask, image_features=images).logits, expected)
    with pytest.raises(ValueError, match="another shape"):
        mit.load_neural_adapter(fam.model("llama", num_hidden_layers=3), tmp_path)


def test_print_trainable_parameters_counts_the_neural_parameters():
    model = nt_model(image_dim=12)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model.print_trainable_parameters()
    neurons = 3 * (64 * RANK + RANK + RANK * (64 + 32) + 64 + 32)
    total = sum(p.numel() for p in fam.model("llama").parameters()) + neurons + 12 * 64 + 64
    assert out.getvalue().strip() == (
        f"trainable params: {neurons + 12 * 64 + 64:,d} || all params: {total:,d} || "
        f"trainable%: {100 * (neurons + 12 * 64 + 64) / total:.4f}"
    )


def test_generate_with_image_tokens_under_left_padding_equals_each_sample_alone():
    model = nt_model(image_dim=12)
    ids, mask = fam.padded_batch()
    images = torch.randn(3, 3, 12, generator=torch.Generator().manual_seed(2))
    batch = model.generate(ids, attention_mask=mask, image_features=images, max_new_tokens=5, do_sample=False)
    for b in range(3):
        alone = ids[b : b + 1, mask[b].bool()]
        single = model.generate(alone, image_features=images[b : b + 1], max_new_tokens=5, do_sample=False)
        assert torch.equal(batch[b], single[0])


def checkpointing_enable(model, **kwargs) -> None:
    """transformers 5.24 renamed gradient_checkpointing_enable to activation_checkpointing_enable (5.17 has only the
    old name, which 5.24 deprecates)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(**({"activation_checkpointing_kwargs": kwargs} if kwargs else {}))
    else:
        model.gradient_checkpointing_enable(**({"gradient_checkpointing_kwargs": kwargs} if kwargs else {}))


def test_gradient_checkpointing_reuses_the_cross_layer_state_and_rho():
    grads = []
    for checkpointing in (False, True):
        model = nt_model(dropout=0.1).train()
        if checkpointing:
            checkpointing_enable(model)
        torch.manual_seed(3)
        ids = fam.padded_batch()[0]
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.neural_named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
    for kwargs in ({"use_reentrant": True}, {}, {"preserve_rng_state": True}):  # absent: torch's default, reentrant
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        with pytest.raises(ValueError, match="reentrant"):
            model(ids, labels=ids)


def test_config_validation_names_the_argument():
    for kwargs, name in (({"rank": 0}, "rank"), ({"sparsity": 1.5}, "sparsity"), ({"targets": "kv"}, "targets")):
        with pytest.raises(ValueError, match=name):
            NeuralTuningConfig(**kwargs)
    with pytest.raises(ValueError, match="start_layer"):
        apply_neural_tuning(fam.model("llama"), NeuralTuningConfig(start_layer=4))


@pytest.mark.parametrize("model_type", sorted(fam.FAMILIES))
@pytest.mark.parametrize("targets", ["qv", "qkv"])
def test_every_family_is_exact_at_zero_init_and_changed_otherwise(model_type, targets):
    base = fam.model(model_type)
    ids, mask = fam.padded_batch()
    logits = base(ids, attention_mask=mask).logits
    config = NeuralTuningConfig(rank=RANK, targets=targets, zero_init_b=True)
    model = apply_neural_tuning(base, config)
    assert torch.equal(model(ids, attention_mask=mask).logits, logits)
    with torch.no_grad():
        for layer in model.model.layers[2:]:
            layer.self_attn.nt_neurons.b_proj.bias.fill_(0.5)
    changed = model(ids, attention_mask=mask).logits
    assert torch.isfinite(changed).all() and not torch.allclose(changed, logits)


def test_deepcopy_rebuilds_the_neural_classes():
    import copy

    model = nt_model(image_dim=12)
    ids, mask = fam.padded_batch()
    images = torch.randn(3, 2, 12)
    clone = copy.deepcopy(model)
    assert type(clone) is type(model) and type(clone.model.layers[1]) is type(model.model.layers[1])
    assert torch.equal(clone(ids, attention_mask=mask, image_features=images).logits,
                       model(ids, attention_mask=mask, image_features=images).logits)  # fmt: skip


def test_refusals_name_what_was_received():
    model = nt_model(image_dim=12)
    ids = fam.padded_batch()[0]
    with pytest.raises(ValueError, match="image_dim=12"):
        model(ids, image_features=torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="KV cache"):
        cache = getattr(model(ids, use_cache=True), CACHE_ARG)  # the output's field has the argument's name
        model(ids, image_features=torch.randn(3, 2, 12), **{CACHE_ARG: cache})
    with pytest.raises(ValueError, match="image_dim=None"):
        nt_model()(ids, image_features=torch.randn(3, 2, 12))
    with pytest.raises(ValueError, match="already a NTLlamaForCausalLM"):
        mit.apply_mit(model, mit.MiTConfig(modality_dim=4))
    with pytest.raises(ValueError, match="already a MiTLlamaForCausalLM"):
        apply_neural_tuning(mit.apply_mit(fam.model("llama"), mit.MiTConfig(modality_dim=4)), NeuralTuningConfig())


def test_tied_embeddings_share_one_trainable_row_set(tmp_path):
    config = NeuralTuningConfig(rank=RANK, new_tokens=["<A>", "<B>"])
    model = apply_neural_tuning(fam.model("llama", tie_word_embeddings=True), config, new_token_ids=[97, 98])
    rows = model.nt_new_tokens
    assert rows.tied and rows.head is rows.embedding
    assert [n for n, _ in model.neural_named_parameters() if "nt_new_tokens" in n] == ["nt_new_tokens.embedding"]
    with torch.no_grad():
        rows.embedding.add_(1.0)
    ids = torch.tensor([[5, 97, 98, 6]])
    hidden = model.model(ids).last_hidden_state
    torch.testing.assert_close(model(ids).logits[..., 97:], hidden @ rows.embedding.T)
    mit.save_neural_adapter(model, tmp_path)
    fresh = mit.load_neural_adapter(fam.model("llama", tie_word_embeddings=True), tmp_path)
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_image_mask_rows_without_an_image_equal_text_only_rows():
    """A row with image_mask False gets its image positions zeroed and masked out (as more left padding): its logits
    at the prompt equal the same prompt run without any image, whatever the image features hold."""
    torch.manual_seed(0)
    model = nt_model(image_dim=12).eval()
    ids = torch.randint(0, 90, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    features = torch.randn(2, 3, 12)
    features[1] = float("nan")  # never read: row 1 has no image
    present = torch.tensor([True, False])
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=mask, image_features=features, image_mask=present).logits
        text = model(input_ids=ids[1:], attention_mask=mask[1:]).logits
        imaged = model(input_ids=ids[:1], attention_mask=mask[:1], image_features=features[:1]).logits
    assert torch.isfinite(both).all()
    torch.testing.assert_close(both[1, 3 + 2 :], text[0, 2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[0], imaged[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"image_mask: expected a \(2,\) bool tensor"):
        model(input_ids=ids, attention_mask=mask, image_features=features, image_mask=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="image_mask: given without image_features"):
        model(input_ids=ids, attention_mask=mask, image_mask=present)


def test_a_bad_adapter_leaves_the_plain_model_and_the_tokenizer_as_they_were(tmp_path):
    """Every check of load_neural_adapter runs before the first change: the tokenizer's new ids, the tensors' names
    and shapes against the parameters apply_neural_tuning would create (built on the meta device), contiguous ids."""
    import json

    from safetensors.torch import load_file, save_file

    class Tokenizer:  # the part of a Hugging Face tokenizer the loader uses
        def __init__(self, known=()):
            self.vocab = {t: 97 + i for i, t in enumerate(known)}

        def get_vocab(self):
            return dict(self.vocab)

        def __len__(self):
            return 97 + len(self.vocab)

        def add_tokens(self, tokens, special_tokens=False):
            for t in tokens:
                self.vocab.setdefault(t, len(self))

        def convert_tokens_to_ids(self, tokens):
            return [self.vocab[t] for t in tokens]

    config = NeuralTuningConfig(rank=RANK, image_dim=12, new_tokens=["<A>", "<B>"])
    trained = apply_neural_tuning(fam.model("llama"), config, Tokenizer())
    saved = tmp_path / "good"
    mit.save_neural_adapter(trained, saved)
    planned = mit.neural.model.planned_neural_parameters(fam.model("llama"), config, [97, 98])
    assert planned == {n: p.shape for n, p in trained.neural_named_parameters()}

    def corrupt(name, edit_tensors=None, edit_meta=None):
        target = tmp_path / name
        target.mkdir()
        tensors, meta = (
            load_file(str(saved / "adapter_model.safetensors")),
            json.loads((saved / "neural_config.json").read_text()),
        )
        edit_tensors and edit_tensors(tensors)
        edit_meta and edit_meta(meta)
        save_file(tensors, str(target / "adapter_model.safetensors"))
        (target / "neural_config.json").write_text(json.dumps(meta))
        return target

    first = next(iter(planned))
    cases = [
        (corrupt("shape", lambda t: t.update({first: torch.zeros(3, 3)})), Tokenizer(), "shape"),
        (corrupt("missing", lambda t: t.pop("nt_image_projection.proj.bias")), Tokenizer(), "missing"),
        (corrupt("extra", lambda t: t.update({"nt_other": torch.zeros(1)})), Tokenizer(), "unexpected"),
        (saved, Tokenizer(known=["<Z>"]), "would give the new tokens ids \\[98, 99\\]"),
        (corrupt("ids", edit_meta=lambda m: m.update(new_token_ids=[97, 99])), None, "contiguous"),
    ]
    for directory, tokenizer, message in cases:
        model = fam.model("llama")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        vocab = None if tokenizer is None else tokenizer.get_vocab()
        with pytest.raises(ValueError, match=message):
            mit.load_neural_adapter(model, directory, tokenizer=tokenizer)
        assert type(model) is LlamaForCausalLM and not mit.neural.is_neural_model(model)
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
        assert all(p.requires_grad for p in model.parameters())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        assert tokenizer is None or tokenizer.get_vocab() == vocab
    tokenizer = Tokenizer()
    loaded = mit.load_neural_adapter(fam.model("llama"), saved, tokenizer=tokenizer)
    assert tokenizer.get_vocab() == {"<A>": 97, "<B>": 98} and loaded.nt_new_token_ids == [97, 98]
