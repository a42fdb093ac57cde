"""The anchor for mmpipe's image preprocessing speed: OpenCLIP's eval transform
(torchvision on PIL: Resize(224, bicubic) on the shorter side, CenterCrop(224), RGB,
ToTensor, Normalize with CLIP's mean and std), one thread, on the given files.

    python3 scripts/bench/pillow_preprocess.py SECONDS SIZE FILE...

Prints one JSON line: images per second, and which implementation ran. Run by
`cargo bench --bench data_throughput`.
"""
import io
import json
import sys
import time

import numpy as np
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def main():
    seconds, size, files = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    blobs = [open(f, "rb").read() for f in files]
    try:
        import torch

        torch.set_num_threads(1)
        from torchvision import transforms as T

        transform = T.Compose(
            [
                T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(size),
                lambda im: im.convert("RGB"),
                T.ToTensor(),
                T.Normalize(MEAN, STD),
            ]
        )
        kind = "torchvision %s on Pillow %s" % (__import__("torchvision").__version__, Image.__version__)
    except ImportError:
        mean = np.array(MEAN, dtype=np.float32)[:, None, None]
        std = np.array(STD, dtype=np.float32)[:, None, None]

        def transform(im):
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size)).convert("RGB")
            x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
            return (x - mean) / std

        kind = "Pillow %s + numpy" % Image.__version__
    done, start = 0, time.perf_counter()
    while True:
        for b in blobs:
            transform(Image.open(io.BytesIO(b)))
            done += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    print(json.dumps({"images_per_second": done / elapsed, "images": done, "implementation": kind}))


if __name__ == "__main__":
    main()
