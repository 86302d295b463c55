"""Training throughput (images/s) of our ViT and ResNet against the same-size stock `transformers` models.

Each pair is built once on our side (``pretrain.models``), exported with ``pretrain.export.export_model`` and
loaded back by ``transformers`` (``AutoModelForImageClassification``: ViTForImageClassification /
ResNetForImageClassification), so both sides have the same architecture, sizes and weights (parameter
counts printed and checked equal). Both train in this one process on the same random images in a plain
loop — forward, cross-entropy on the logits, backward, ``torch.optim.AdamW`` step, zero_grad — in the same
dtype (``--dtype auto``: bf16 autocast where our trainer would use it, on CUDA and on CPUs with native bf16;
else fp32). ``--compile`` compiles both sides. Our side runs as our trainer runs it: a ResNet (its spec's
``channels_last``) in NHWC memory format, which ``transformers`` does not do.

* ``vit``: the encoder of configs/vit-mae-cpu.yaml (6 x 192, 3 heads, 4-pixel patches) at 28 px, with a
  10-class head (``--preset vit-b16``: ViT-B/16 at 224 px, for a GPU);
* ``resnet``: configs/resnet-cpu.yaml's widths (32..256, basic blocks) with the ``imagenet`` stem (the only
  one Hugging Face has) at 64 px (``--preset resnet50``: ResNet-50 at 224 px).

Timing: ``--warmup`` untimed steps per model, then ``--rounds`` rounds of ``--steps`` timed steps per model
in ABBA order (ours, HF, HF, ours, ...). A round's images/s is batch x steps / its wall time;
``ours_img_s`` / ``hf_img_s`` are each side's best round, ``ratio`` = ours / HF (> 1: ours is faster),
``ratio_median`` the ratio of the medians.

    python bench/image_throughput.py            # a table
    python bench/image_throughput.py --json
    python bench/image_throughput.py --device cuda --compile --preset vit-b16 --only vit
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "vit": {"model": {"arch": "vit", "n_layer": 6, "n_head": 3, "d_model": 192, "patch_size": 4,
                      "norm_eps": 1e-6, "decoder_layers": 0}, "image_size": 28, "channels": 1, "batch": 128},
    "resnet": {"model": {"arch": "resnet", "stem_width": 32, "widths": [32, 64, 128, 256],
                         "stem": "imagenet"}, "image_size": 64, "channels": 1, "batch": 128},
}
PRESETS = {
    "vit-b16": {"vit": {"model": {"arch": "vit", "n_layer": 12, "n_head": 12, "d_model": 768,
                                  "patch_size": 16, "norm_eps": 1e-12, "decoder_layers": 0},
                        "image_size": 224, "channels": 3, "batch": 128}},
    "resnet50": {"resnet": {"model": {"arch": "resnet", "stem_width": 64, "widths": [256, 512, 1024, 2048],
                                      "depths": [3, 4, 6, 3], "block": "bottleneck", "stem": "imagenet"},
                            "image_size": 224, "channels": 3, "batch": 128}},
}


def build_pair(kind: str, size: dict, device: torch.device, n_classes: int = 10):
    from transformers import AutoModelForImageClassification

    from pretrain.config import Config, from_dict
    from pretrain.export import export_model
    from pretrain.models import build_model, get_spec

    c = size["channels"]
    cfg = from_dict(Config, {"objective": "supervised", "model": {
        **size["model"], "image_size": size["image_size"], "channels": c, "num_classes": n_classes,
        "image_mean": [0.5] * c, "image_std": [0.25] * c}})
    torch.manual_seed(0)
    ours = build_model(cfg.model)
    with tempfile.TemporaryDirectory() as d:
        export_model(ours, cfg, Path(d) / "hf", overwrite=True)
        hf = AutoModelForImageClassification.from_pretrained(Path(d) / "hf", attn_implementation="sdpa") \
            if kind == "vit" else AutoModelForImageClassification.from_pretrained(Path(d) / "hf")
    n_ours, n_hf = (sum(p.numel() for p in m.parameters()) for m in (ours, hf))
    assert n_ours == n_hf, (n_ours, n_hf)
    if get_spec(cfg.model.arch).channels_last:  # as our trainer runs it (transformers leaves it NCHW)
        ours = ours.to(memory_format=torch.channels_last)
    return ours.to(device).train(), hf.to(device).train(), n_ours


def make_step(model, hf: bool, device: torch.device, dtype: torch.dtype | None):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, fused=device.type == "cuda" or None)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            logits = model(pixel_values=x).logits if hf else model(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_pair(kind: str, size: dict, args) -> dict:
    from pretrain.hardware import autocast_dtype

    device = torch.device(args.device)
    ours, hf, n = build_pair(kind, size, device)
    dt = autocast_dtype(device, args.dtype)
    dtype = dt if dt != torch.float32 else None
    fwd = {"ours": ours, "hf": hf}
    if args.compile:
        fwd = {k: torch.compile(m) for k, m in fwd.items()}
    steps = {name: make_step(fwd[name], name == "hf", device, dtype) for name in ("ours", "hf")}
    b, s, c = args.batch_size or size["batch"], size["image_size"], size["channels"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, s, s, generator=gen).to(device)
    y = torch.randint(0, 10, (b,), generator=gen).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for name in ("ours", "hf"):
        for _ in range(args.warmup):
            steps[name](x, y)
    rates: dict[str, list[float]] = {"ours": [], "hf": []}
    for r in range(args.rounds):
        for name in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
            sync()
            t = time.perf_counter()
            for _ in range(args.steps):
                steps[name](x, y)
            sync()
            rates[name].append(b * args.steps / (time.perf_counter() - t))
    best = {k: max(v) for k, v in rates.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"params": n, "image_size": s, "channels": c, "batch": b, "dtype": str(dt).replace("torch.", ""),
            "ours_img_s": round(best["ours"], 1), "hf_img_s": round(best["hf"], 1),
            "ratio": round(best["ours"] / best["hf"], 3),
            "ratio_median": round(med["ours"] / med["hf"], 3), "rounds": rates}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--only", choices=sorted(SIZES))
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {**SIZES, **(PRESETS[args.preset] if args.preset else {})}
    kinds = [args.only] if args.only else (list(PRESETS[args.preset]) if args.preset else list(SIZES))
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "device": args.device,
           "threads": torch.get_num_threads(), "compile": args.compile}
    for kind in kinds:
        out[kind] = bench_pair(kind, sizes[kind], args)
        r = out[kind]
        print(f"{kind:7s} {r['params'] / 1e6:.2f}M params, {r['image_size']} px x {r['channels']}, batch "
              f"{r['batch']}, {r['dtype']}: ours {r['ours_img_s']:,.0f} img/s, transformers "
              f"{r['hf_img_s']:,.0f} img/s, ratio {r['ratio']:.3f} (medians {r['ratio_median']:.3f})",
              file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
