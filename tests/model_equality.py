"""Exact model equality for the reversibility tests: a model given back by ``unload`` is the original, bit for bit."""

from __future__ import annotations

import torch

from mit.hf import Rebuildable

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def assert_same_model(got: torch.nn.Module, expected: torch.nn.Module, *, same_modes: bool = True) -> None:
    """``got`` is ``expected`` bit for bit: classes, module tree, attributes, hooks, state dict, requires_grad,
    config (with the attention implementation), no method's class left; ``same_modes``: every module's train / eval
    mode too (False where transformers' ``resize_token_embeddings`` made a new LM head, which starts in train mode)."""
    assert type(got) is type(expected)
    got_modules, expected_modules = dict(got.named_modules()), dict(expected.named_modules())
    assert list(got_modules) == list(expected_modules)
    for name, module in got_modules.items():
        other = expected_modules[name]
        assert type(module) is type(other), name
        assert sorted(vars(module)) == sorted(vars(other)), name
        assert list(module._modules) == list(other._modules), name
        for hooks in HOOK_DICTS:
            assert len(getattr(module, hooks)) == len(getattr(other, hooks)), (name, hooks)
        assert not same_modes or module.training == other.training, name
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert list(got_state) == list(expected_state)
    for key, value in got_state.items():
        assert value.dtype == expected_state[key].dtype, key
        assert torch.equal(value, expected_state[key]), key
    assert [(n, p.requires_grad) for n, p in got.named_parameters()] == [
        (n, p.requires_grad) for n, p in expected.named_parameters()
    ]
    assert got.config._attn_implementation == expected.config._attn_implementation
    assert got.config.to_dict() == expected.config.to_dict()
    assert not isinstance(got, Rebuildable) and not any(isinstance(m, Rebuildable) for m in got.modules())
