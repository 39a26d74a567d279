"""Is a model's forward on this GPU the forward it has on the CPU? PPL of the first TOKENS WikiText-2 validation
tokens (512-token windows, the study's protocol) in float32 on the CPU (the reference) and on CUDA under each
attention implementation, plus each layer's hidden-state difference on the first window. Writes the first
implementation whose PPL is within 1 % of the CPU's to OUT_FILE (nothing, and exit 1, if none is).

    python3 scripts/gpu/attn_check.py gemma3-270m /root/hold/attn_impl [TOKENS]
"""

from __future__ import annotations

import sys
import time

import torch

import prunepath
from prunepath.evaluation.common import resolve_data_path
from prunepath.evaluation.perplexity import evaluate_perplexity

name, out_file = sys.argv[1], sys.argv[2]
tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
model, tok = prunepath.load_model(name)
text = open(resolve_data_path("wikitext-2/wiki.valid.raw"), encoding="utf-8").read()
ids = tok(text[: tokens * 8], add_special_tokens=False, return_tensors="pt").input_ids[0][:tokens]


def ppl(m) -> float:
    return float(evaluate_perplexity(m, tok, ids.tolist(), window=512, batch_size=4, progress=False)["ppl"])


def hidden(m, dev) -> list[torch.Tensor]:
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    x = torch.tensor([bos + ids[:511].tolist()], device=dev)
    with torch.no_grad():
        return [h.float().cpu() for h in m(input_ids=x, output_hidden_states=True).hidden_states]


torch.set_num_threads(16)
t = time.time()
ref = ppl(model.eval())
ref_h = hidden(model, "cpu")
print(f"cpu float32: PPL {ref:.3f} ({time.time() - t:.1f} s)", flush=True)
model.to("cuda")
choice = None
for impl in ("sdpa", "eager"):
    model.set_attn_implementation(impl)
    t = time.time()
    p = ppl(model)
    hs = hidden(model, "cuda")
    diffs = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) for a, b in zip(hs, ref_h)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    ok = abs(p / ref - 1) < 0.01
    print(f"cuda {impl} float32: PPL {p:.3f} ({p / ref:.4f}x cpu, {time.time() - t:.1f} s); hidden-state max rel "
          f"diff by layer {' '.join(f'{d:.1e}' for d in diffs)} (worst layer {worst}); {'OK' if ok else 'WRONG'}",
          flush=True)
    if ok and choice is None:
        choice = impl
if choice is None:
    sys.exit("no attention implementation reproduces the CPU's PPL on this GPU")
open(out_file, "w").write(choice)
print("choice:", choice)
