"""The package's shape: ``import mit`` and ``apply_mit`` load only the integration, not the tuning framework, the demo
or their dependencies (accelerate, PIL, PyYAML, scikit-learn, matplotlib, the CLIP code); the tuning names still
resolve on first use. Each check runs in a fresh interpreter (the test process has imported everything)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = ["accelerate", "PIL", "yaml", "sklearn", "matplotlib", "mit.tuning.clip", "mit.tuning.trainer",
         "mit.tuning.data", "mit.demo.digits", "mit.neural"]  # fmt: skip


def loaded_after(code: str) -> dict:
    script = textwrap.dedent(code) + textwrap.dedent(f"""
        import json, sys
        print(json.dumps({{"after": {{m: m in sys.modules for m in {[*HEAVY, "transformers"]!r}}},
                          "baseline": {{m: m in BASELINE for m in {HEAVY!r}}}}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_mit_loads_no_optional_part_and_not_even_transformers():
    out = loaded_after("BASELINE = set()\nimport mit\n")
    assert not any(out["after"].values()), out["after"]


def test_apply_mit_adds_nothing_heavy_beyond_what_transformers_loads():
    out = loaded_after("""
        import sys
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))
        BASELINE = set(sys.modules)  # what transformers itself imported (it may load accelerate, PIL, ...)
        import mit
        model = mit.apply_mit(model, mit.MiTConfig(modality_dim=8))
        ids = torch.randint(0, 64, (2, 5))
        model(ids, modality_embedding=torch.randn(2, 8))
    """)
    added = [m for m in HEAVY if out["after"][m] and not out["baseline"][m]]
    assert added == [], added


def test_tuning_names_resolve_lazily():
    out = loaded_after("BASELINE = set()\nimport mit\nassert mit.Trainer.__module__ == 'mit.tuning.trainer'\n")
    assert out["after"]["mit.tuning.trainer"] and not out["after"]["mit.demo.digits"]
