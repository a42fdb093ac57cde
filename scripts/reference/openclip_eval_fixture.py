"""OpenCLIP's and clip_benchmark's own zero-shot and retrieval scores for the evaluation test
(tests/suite/zero_shot.rs, `openclip_scores`): what `mmpipe eval` must give on the same
model and images.

    python3 -m venv /tmp/openclip-venv
    /tmp/openclip-venv/bin/pip install torch open_clip_torch safetensors clip_benchmark 'numpy<2'
    /tmp/openclip-venv/bin/python scripts/reference/openclip_eval_fixture.py tests/fixtures/openclip-eval

It writes into that folder:
- `model.json`: an OpenCLIP model config (the tiny test model with CLIP's 49,408-token
  vocabulary), read by `mmpipe eval --model` as OpenCLIP's own config files are;
- `weights.safetensors`: OpenCLIP's state_dict of that model (seed 0), except that the token
  embedding keeps only the rows the prompts and captions use (`token_embedding.ids`,
  `token_embedding.rows`; the others are zero in the model scored here too), so that the
  fixture is 100 KB and not 5 MB; the test writes the whole table back;
- `classes/CLASS/*.png`: 32 images of 8 classes (16x16 crops of the real-photo fixture's
  textures, already at the model's size, so no resize filter comes between the two);
- `templates.txt`: three prompt templates;
- `retrieval.tar`: the 22 real photos at 16x16 with their captions, as a WebDataset shard;
- `expected.json`: clip_benchmark's zero-shot scores (acc1, acc5, mean per-class recall,
  with OpenCLIP's own `build_zero_shot_classifier` giving the same classifier), its
  retrieval recall@1/5/10 both ways, and OpenCLIP's tokens of every prompt and caption.
"""
import io
import json
import os
import sys
import tarfile

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import open_clip
from open_clip.model import CLIP
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 24, "head_width": 12, "layers": 2, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 24, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}
TEMPLATES = ["a photo of {}.", "a close-up photo of the {}.", "a texture of {}."]
# Class folder name -> the real-photo fixture's sample whose crops it holds.
CLASSES = {
    "brick": "000011",
    "coins": "000007",
    "galaxies": "000005",
    "grass": "000012",
    "gravel": "000013",
    "moon": "000009",
    "page": "000017",
    "retina": "000006",
}
SIDE = 16
# Training of the fixture model before it is scored: enough to lift it off chance.
STEPS = 12
STEP_LR = 2e-3


def real_photos(repo):
    """(key -> (PIL image, caption)) of tests/fixtures/real-photos.tar."""
    photos = {}
    with tarfile.open(os.path.join(repo, "tests/fixtures/real-photos.tar")) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    for name, data in members.items():
        key, ext = name.split(".", 1)
        if ext in ("png", "jpg"):
            image = Image.open(io.BytesIO(data)).convert("RGB")
            photos[key] = (image, members[key + ".txt"].decode().strip())
    return dict(sorted(photos.items()))


def square(image, side=SIDE):
    """The largest centred square, resized to side x side (bicubic, as OpenCLIP does)."""
    w, h = image.size
    e = min(w, h)
    box = ((w - e) // 2, (h - e) // 2, (w - e) // 2 + e, (h - e) // 2 + e)
    return image.crop(box).resize((side, side), Image.BICUBIC)


def png(image):
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_fixture_images(out, photos):
    for name, key in CLASSES.items():
        image = photos[key][0]
        w, h = image.size
        folder = os.path.join(out, "classes", name)
        os.makedirs(folder, exist_ok=True)
        # Four 40x40 crops from the corners, each scaled to the model's size.
        for i, (x, y) in enumerate([(0, 0), (w - 40, 0), (0, h - 40), (w - 40, h - 40)]):
            crop = image.crop((x, y, x + 40, y + 40)).resize((SIDE, SIDE), Image.BICUBIC)
            with open(os.path.join(folder, f"{i}.png"), "wb") as f:
                f.write(png(crop))
    with tarfile.open(os.path.join(out, "retrieval.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, (image, caption) in photos.items():
            for ext, data in (("png", png(square(image))), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    with open(os.path.join(out, "templates.txt"), "w") as f:
        f.write("".join(t + "\n" for t in TEMPLATES))
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
        f.write("\n")


class Pairs(torch.utils.data.Dataset):
    """The retrieval shard as clip_benchmark reads a dataset: (image, [caption])."""

    def __init__(self, photos, preprocess):
        self.items = [(preprocess(square(image)), [caption]) for image, caption in photos.values()]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def min_gap(logits, labels):
    """The smallest |logit of the label - any other logit| over the rows."""
    own = logits.gather(1, labels[:, None])
    gaps = (logits - own).abs()
    gaps[torch.arange(len(labels)), labels] = float("inf")
    return float(gaps.min())


def train_briefly(model, class_images, pair_images, prompts, captions, tokenizer):
    """A few AdamW steps of OpenCLIP's own loss on the fixture's images, so that the scores
    sit between chance and perfect (an untrained tower maps every image to nearly one
    feature, and every set scores its chance level)."""
    images = torch.stack([x for x, _ in class_images] + [x for x, _ in pair_images.items])
    g = torch.Generator().manual_seed(2)
    loss_fn = open_clip.loss.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=STEP_LR, weight_decay=0.0)
    classnames = class_images.classes
    model.train()
    for _ in range(STEPS):
        # Each class image with one of its class's prompts, drawn afresh each step.
        texts = [prompts[classnames[y]][int(torch.randint(len(TEMPLATES), (1,), generator=g))] for _, y in class_images.samples]
        texts += captions
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def main(out):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.makedirs(out, exist_ok=True)
    photos = real_photos(repo)
    write_fixture_images(out, photos)

    torch.manual_seed(0)
    model = CLIP(
        embed_dim=CONFIG["embed_dim"],
        vision_cfg=CONFIG["vision_cfg"],
        text_cfg=CONFIG["text_cfg"],
    ).eval()
    context = CONFIG["text_cfg"]["context_length"]
    tokenizer = lambda texts: open_clip.tokenize(texts, context_length=context)
    preprocess = open_clip.image_transform(SIDE, is_train=False)

    classnames = sorted(CLASSES)
    prompts = {c: [t.replace("{}", c) for t in TEMPLATES] for c in classnames}
    captions = [caption for _, caption in photos.values()]
    texts = [p for c in classnames for p in prompts[c]] + captions
    tokens = tokenizer(texts)
    class_images = __import__("torchvision").datasets.ImageFolder(os.path.join(out, "classes"), transform=preprocess)
    assert class_images.classes == classnames
    pair_images = Pairs(photos, preprocess)
    train_briefly(model, class_images, pair_images, prompts, captions, tokenizer)
    used = torch.unique(tokens)
    # Rows no text uses are zero (the model scored here is the one stored).
    with torch.no_grad():
        keep = torch.zeros(model.token_embedding.weight.shape[0], dtype=torch.bool)
        keep[used] = True
        model.token_embedding.weight[~keep] = 0.0

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    embedding = state.pop("token_embedding.weight")
    state["token_embedding.ids"] = used.to(torch.int64).contiguous()
    state["token_embedding.rows"] = embedding[used].contiguous()
    save_file(state, os.path.join(out, "weights.safetensors"))

    images = torch.utils.data.DataLoader(class_images, batch_size=8)
    zero_shot = zeroshot_classification.evaluate(
        model, images, tokenizer, classnames, prompts, "cpu", amp=False, verbose=False
    )
    # OpenCLIP's own classifier is clip_benchmark's: the normalised mean over templates.
    with torch.no_grad():
        ours = build_zero_shot_classifier(
            model, tokenizer, classnames, [lambda c, t=t: t.replace("{}", c) for t in TEMPLATES],
            num_classes_per_batch=2, device="cpu", use_tqdm=False,
        )
        theirs = zeroshot_classification.zero_shot_classifier(model, tokenizer, classnames, prompts, "cpu", amp=False)
    assert torch.allclose(ours, theirs, atol=1e-6), (ours - theirs).abs().max()

    # How far each label's logit is from every other one, so that float noise between two
    # implementations cannot move a rank (the test's comparison is exact).
    with torch.no_grad():
        feats = torch.cat([F.normalize(model.encode_image(x), dim=-1) for x, _ in images])
        labels = torch.tensor([y for _, y in class_images.samples])
        margin = min_gap(feats @ theirs, labels)
        image = F.normalize(model.encode_image(torch.stack([x for x, _ in pair_images.items])), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        diagonal = torch.arange(len(captions))
        retrieval_margin = min(min_gap(image @ text.T, diagonal), min_gap(text @ image.T, diagonal))

    pairs = torch.utils.data.DataLoader(
        pair_images,
        batch_size=8,
        collate_fn=lambda b: (torch.stack([x for x, _ in b]), [t for _, t in b]),
    )
    retrieval = zeroshot_retrieval.evaluate(model, pairs, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])

    expected = {
        "source": "scripts/reference/openclip_eval_fixture.py: open_clip_torch "
        f"{open_clip.__version__}, clip_benchmark zeroshot_classification / zeroshot_retrieval, torch {torch.__version__}",
        "zero_shot": {k: float(zero_shot[k]) for k in ("acc1", "acc5", "mean_per_class_recall")},
        "zero_shot_min_gap": margin,
        "retrieval_min_gap": retrieval_margin,
        "retrieval": {k: float(v) for k, v in retrieval.items()},
        "tokens": {t: row[row.nonzero()].flatten().tolist() for t, row in zip(texts, tokens)},
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    print(json.dumps({k: expected[k] for k in ("zero_shot", "zero_shot_min_gap", "retrieval", "retrieval_min_gap")}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
