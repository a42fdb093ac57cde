"""How far OpenCLIP's own bf16 autocast step is from its f32 step, against mmpipe's bf16.

    cargo run --release --example precision_reference -- target/precision-reference
    /tmp/openclip-venv/bin/python scripts/reference/openclip_bf16.py target/precision-reference

Loads mmpipe's initial weights of the test model (OpenCLIP's names) into OpenCLIP's CLIP
of the same config, runs the batch of step 0 as open_clip_train does (model and ClipLoss
under torch.autocast in bf16, parameters in f32), and once without autocast; prints for
every parameter ||g_bf16 - g_fp32|| / ||g_fp32|| for OpenCLIP and for mmpipe (its two
gradient files), and mmpipe's f32 against OpenCLIP's f32 (the same model: ~1e-6).
"""
import sys

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import load_file


def model():
    m = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=2, width=24, head_width=12, mlp_ratio=2, patch_size=8, image_size=16),
        text_cfg=CLIPTextCfg(context_length=12, vocab_size=32, width=24, heads=2, layers=2, mlp_ratio=2),
        quick_gelu=False,
    )
    return m.train()


def encode_text(m, tokens, eot):
    # OpenCLIP's encode_text, pooled at mmpipe's end-of-text positions (OpenCLIP pools at
    # the largest token id, which the synthetic captions do not put last).
    x = m.token_embedding(tokens) + m.positional_embedding
    x = m.transformer(x, attn_mask=m.attn_mask)
    x = m.ln_final(x)
    return x[torch.arange(x.shape[0]), eot] @ m.text_projection


def grads(m, batch, autocast):
    m.zero_grad()
    loss_fn = ClipLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        image = F.normalize(m.encode_image(batch["images"]), dim=-1)
        text = F.normalize(encode_text(m, batch["tokens"], batch["eot"]), dim=-1)
        loss = loss_fn(image, text, m.logit_scale.exp())
    loss.backward()
    out = {n: p.grad.detach().double().clone() for n, p in m.named_parameters()}
    out["loss"] = loss.detach().double().reshape(1)
    return out


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(folder):
    m = model()
    m.load_state_dict(load_file(f"{folder}/weights.safetensors"), strict=True)
    batch = load_file(f"{folder}/batch.safetensors")
    ours = {k: {n: t.double() for n, t in load_file(f"{folder}/grads-{k}.safetensors").items()} for k in ("fp32", "bf16")}
    theirs = {"fp32": grads(m, batch, False), "bf16": grads(m, batch, True)}
    print(f"{'parameter':<48} {'OpenCLIP bf16':>14} {'mmpipe bf16':>12} {'mmpipe vs OpenCLIP f32':>23}")
    worst = {"OpenCLIP": 0.0, "mmpipe": 0.0}
    for name in sorted(theirs["fp32"]):
        o = rel(theirs["bf16"][name], theirs["fp32"][name])
        u = rel(ours["bf16"][name], ours["fp32"][name])
        same = rel(ours["fp32"][name], theirs["fp32"][name])
        worst["OpenCLIP"] = max(worst["OpenCLIP"], o)
        worst["mmpipe"] = max(worst["mmpipe"], u)
        print(f"{name:<48} {o:>14.2e} {u:>12.2e} {same:>23.1e}")
    print(f"worst: OpenCLIP bf16 {worst['OpenCLIP']:.2e}, mmpipe bf16 {worst['mmpipe']:.2e}")
    for tower, keep in [("image", lambda n: n.startswith("visual.")),
                        ("text", lambda n: not n.startswith("visual.") and n not in ("loss", "logit_scale"))]:
        names = [n for n in theirs["fp32"] if keep(n)]
        joint = lambda g: torch.cat([g[n].flatten() for n in names])
        print(f"{tower} tower, all gradients together: OpenCLIP bf16 "
              f"{rel(joint(theirs['bf16']), joint(theirs['fp32'])):.2e}, mmpipe bf16 "
              f"{rel(joint(ours['bf16']), joint(ours['fp32'])):.2e}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/precision-reference")
