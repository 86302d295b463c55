"""The demo's pipeline runs end to end on its embedded corpus (a few steps only, to stay fast)."""

from __future__ import annotations

import pytest

from pretrain.demo import SNIPPETS, run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    res = run_demo(tmp_path / "demo", max_steps=3, quiet=True, finetune_epochs=1)
    assert res["corpus_files"] > 50 and res["train_tokens"] > 100_000 and res["steps"] == 3
    assert res["val_loss"] > 0 and 0 < res["val_bits_per_byte"] < 20
    assert res["sample"].startswith(res["sample_prompt"])
    assert [a for a, _, _ in res["neighbours"]] == SNIPPETS
    assert all(b in SNIPPETS and b != a and -1.0 <= s <= 1.0 for a, b, s in res["neighbours"])
    assert len(res["finetune_modules"]) == 4 and set(res["finetune_accuracy"]) == {"pretrained", "scratch"}
    assert all(0.0 <= a <= 1.0 for a in res["finetune_accuracy"].values())
    assert (tmp_path / "demo" / "finetune_pretrained" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "run" / "checkpoints" / "latest").exists()
