"""Images/s and MFU of `pretrain train` itself on images — the whole trainer (prefetching loader, the
objective's augmentation and masking, bf16 autocast and torch.compile as configured, clipping, fused AdamW,
metrics) — as it logs them.

The data are ``--images`` random RGB images of the preset's size written as a prepared image folder (no
download; pixel content does not change the speed); the model a YAML preset (default
``configs/vit-b16-mae.yaml``: ViT-B/16 MAE at 224 px, bf16, compiled, micro-batch 256). Evaluation and
periodic checkpoints are off. The first ``--skip`` log intervals (compilation, warm-up) are left out; the
figures are the median and best of the others: ``img_s`` (the trainer's ``images_per_s``) and ``mfu`` (its
own: FLOPs per image — for MAE the encoder on the visible quarter of the patches plus the decoder on all —
against the device's dense bf16 peak; null on a CPU).

    python bench/image_trainer.py --json                      # on a GPU
    python bench/image_trainer.py --config configs/vit-mae-cpu.yaml --size 28 --channels 1 --steps 20 \\
        --set train.batch_size=32 --device cpu                # anywhere (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "vit-b16-mae.yaml"))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--skip", type=int, default=2, help="first log intervals left out (compilation, warm-up)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from pretrain.cli import main as cli
    from pretrain.data.images import write_prepared

    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        n_val = 64
        images = rng.integers(0, 256, (args.images + n_val, args.size, args.size, args.channels), np.uint8)
        write_prepared(Path(d) / "data", {"train": (images[:-n_val], None), "val": (images[-n_val:], None)},
                       [])
        run = Path(d) / "run"
        sets = [x for kv in args.set for x in ("--" + kv.split("=", 1)[0], kv.split("=", 1)[1])]
        rc = cli(["train", args.config, "--out", str(run), "--data.path", str(Path(d) / "data"),
                  "--train.max_steps", str(args.steps), "--train.eval_interval", "0",
                  "--train.ckpt_interval", str(10**9), "--train.log_interval", str(args.log_interval),
                  "--train.warmup_steps", "10", "--train.device", args.device, "--train.plot", "false",
                  "--quiet", *sets])
        if rc != 0:
            raise SystemExit(rc)
        logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        cfg = (run / "config.yaml").read_text()
    logs = [r for r in logs if "images_per_s" in r][args.skip:]
    rates = [r["images_per_s"] for r in logs]
    mfus = [r["mfu"] for r in logs if r.get("mfu") is not None]
    res = {"config": args.config, "device": args.device, "steps": args.steps, "intervals_used": len(rates),
           "img_s_median": round(statistics.median(rates), 1), "img_s_best": round(max(rates), 1),
           "mfu_median": round(statistics.median(mfus), 4) if mfus else None,
           "mfu_best": round(max(mfus), 4) if mfus else None, "resolved_config": cfg}
    print(f"pretrain train {Path(args.config).name}: {res['img_s_median']:,} images/s (median; best "
          f"{res['img_s_best']:,}), MFU {res['mfu_median']}", file=sys.stderr)
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
