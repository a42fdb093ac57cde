"""OpenCLIP compatibility fixture for tests/suite/openclip.rs, and the reverse check.

    python3 -m venv /tmp/openclip-venv && /tmp/openclip-venv/bin/pip install torch open_clip_torch safetensors
    /tmp/openclip-venv/bin/python scripts/reference/openclip_fixture.py write tests/fixtures/openclip-tiny.safetensors
    /tmp/openclip-venv/bin/python scripts/reference/openclip_fixture.py write-attn-pool tests/fixtures/openclip-tiny-attnpool.safetensors
    /tmp/openclip-venv/bin/python scripts/reference/openclip_fixture.py check MMPIPE_CHECKPOINT.safetensors

`write` builds OpenCLIP's own CLIP with the test model's config (tests/suite/common.rs,
TEST_MODEL), saves its state_dict as safetensors together with fixed inputs
(`input.images`, `input.tokens`) and OpenCLIP's outputs for them (`output.image_features`,
`output.text_features`, unnormalised). `check` loads an mmpipe checkpoint of the same
config into OpenCLIP's model with strict=True and prints its outputs on the same inputs.
"""
import sys

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import load_file, save_file


def model(attn_pool=False):
    torch.manual_seed(0)
    pool = dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2) if attn_pool else {}
    m = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=2, width=24, head_width=12, mlp_ratio=2, patch_size=8, image_size=16, **pool),
        text_cfg=CLIPTextCfg(context_length=12, vocab_size=32, width=24, heads=2, layers=2, mlp_ratio=2),
        quick_gelu=False,
    )
    return m.eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 16, 16, generator=g)
    # OpenCLIP pools text at the largest id: the end-of-text token is the vocabulary's last.
    tokens = torch.tensor([[1, 5, 9, 31, 0, 0, 0, 0, 0, 0, 0, 0], [1, 7, 7, 3, 11, 8, 31, 0, 0, 0, 0, 0]])
    return images, tokens


def main(cmd, path):
    images, tokens = inputs()
    m = model(attn_pool=cmd == "write-attn-pool")
    if cmd.startswith("write"):
        with torch.no_grad():
            out = {"output.image_features": m.encode_image(images), "output.text_features": m.encode_text(tokens)}
        tensors = {k: v.detach().contiguous() for k, v in m.state_dict().items()}
        tensors.update({"input.images": images, "input.tokens": tokens})
        tensors.update(out)
        save_file(tensors, path)
        print(f"wrote {path}: {len(m.state_dict())} model tensors")
    else:
        sd = {k: v for k, v in load_file(path).items() if not k.startswith(("input.", "output."))}
        m.load_state_dict(sd, strict=True)
        with torch.no_grad():
            print("image", m.encode_image(images)[0, :4].tolist())
            print("text", m.encode_text(tokens)[1, :4].tolist())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
