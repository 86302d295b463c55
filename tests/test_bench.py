"""The side-by-side training-throughput bench (bench/train_throughput.py) at a tiny size: it runs, both sides
have the same parameter count, the ratio is what its figures say, presets are defaults that explicit flags
override; on a GPU (marked, skipped without one) the bf16 + compiled path reports MFU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py"
TINY = ["--d-model", "32", "--n-layer", "2", "--n-head", "2", "--seq-len", "16", "--batch-size", "2",
        "--vocab", "64", "--steps", "1", "--rounds", "2", "--warmup", "1", "--json"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check(result: dict, pairs: tuple[str, ...]) -> None:
    for name in pairs:
        r = result[name]
        assert r["ours_params"] == r["hf_params"] > 0
        # tok/s are printed to 0.1: on a loaded machine (tens of tok/s) that rounding alone moves the ratio
        rounding = 0.1 / min(r["ours_tok_s"], r["hf_tok_s"])
        assert r["ratio"] == pytest.approx(r["ours_tok_s"] / r["hf_tok_s"], rel=1e-3 + rounding)
        assert len(r["ours_tok_s_per_round"]) == len(r["hf_tok_s_per_round"]) == result["config"]["rounds"]
        assert max(r["ours_tok_s_per_round"]) == pytest.approx(r["ours_tok_s"], rel=1e-3)
        assert r["ours_last_loss"] > 0 and r["hf_last_loss"] > 0


@pytest.mark.slow
def test_cpu_pairs(bench, capsys):
    result = bench.main(TINY)
    json.loads(capsys.readouterr().out)  # --json: one object on stdout
    check(result, ("gpt", "bert"))
    assert result["config"]["device"] == "cpu" and result["config"]["optimizer"]["hf"] == "foreach"
    assert result["gpt"]["matmul_peak_gflops"] > 0 and "ours_mfu" not in result["gpt"]
    assert result["config"]["dtype"] == result["config"]["hf_dtype"] and result["gpt"]["ceiling_ratio"] > 0


def test_dtypes_per_side(bench, monkeypatch):
    import pretrain.hardware as hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)  # --dtype auto as on such a CPU
    result = bench.main([*TINY, "--only", "gpt", "--hf-dtype", "fp32"])
    assert (result["config"]["dtype"], result["config"]["hf_dtype"]) == ("bf16", "fp32")
    assert result["gpt"]["ceiling_ratio"] is None  # no ceiling across dtypes
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    args = bench.parse_args([])
    bench.resolve_dtypes(args)
    assert (args.ours_dtype, args.hf_dtype_resolved) == ("fp32", "fp32")


def test_preset_sets_defaults_flags_win(bench):
    args = bench.parse_args(["--preset", "gpt2-small", "--batch-size", "4"])
    assert (args.d_model, args.n_layer, args.n_head, args.d_ff, args.vocab, args.seq_len) == \
        (768, 12, 12, 2048, 50304, 1024)
    assert args.batch_size == 4  # an explicit flag beats the preset
    from pretrain.config import ModelConfig
    from pretrain.models.gpt import GPT

    with torch.device("meta"):
        n = GPT(ModelConfig(d_model=768, n_layer=12, n_head=12, d_ff=2048, vocab_size=50304,
                            max_seq_len=1024)).num_params()
    assert 120e6 < n < 130e6  # "GPT-2 small size": 124M with tied embeddings


@pytest.mark.slow
def test_cpu_bf16_and_compiled_both_sides(bench):
    result = bench.main([*TINY, "--only", "gpt", "--dtype", "bf16", "--compile", "--hf-compile"])
    check(result, ("gpt",))
    c = result["config"]
    assert c["dtype"] == "bf16" and c["ours_compile"] and c["hf_compile"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_compiled_reports_mfu(bench):
    result = bench.main([*TINY, "--device", "cuda", "--dtype", "bf16", "--compile", "--hf-compile"])
    check(result, ("gpt", "bert"))
    assert result["config"]["optimizer"]["hf"] == "fused"  # auto on CUDA: its Trainer's default
    r = result["gpt"]
    assert r["ours_peak_mem_gib"] > 0 and r["hf_peak_mem_gib"] > 0
    if r["peak_tflops"]:  # a device in the peak table (H100/H200/A100...)
        assert 0 < r["ours_mfu"] < 1 and 0 < r["hf_mfu"] < 1


@pytest.mark.slow
def test_trainer_mfu_reports_the_trainers_own_figures():
    spec = importlib.util.spec_from_file_location("trainer_mfu", BENCH.parent / "trainer_mfu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = BENCH.parents[1]
    r = mod.main(["--config", str(root / "configs" / "tiny.yaml"), "--vocab", "300",
                  "--tokenizer-vocab", "300", "--steps", "20", "--log-interval", "5", "--skip", "1",
                  "--batch-size", "2", "--device", "cpu", "--set", "data.seq_len=32"])
    assert r["steps"] == 20 and r["intervals_used"] == 3 and len(r["tok_s_per_log"]) == 3
    assert r["tok_s_median"] > 0 and r["tok_s_best"] == max(r["tok_s_per_log"])
    assert r["model_vocab"] == 300 and r["tokens_per_step"] == 2 * 32
    assert r["mfu_median"] is None  # no MFU on a CPU (no bf16 peak to measure against)
    with pytest.raises(SystemExit):
        mod.parse_args(["--steps", "10", "--log-interval", "10", "--skip", "2"])


def _load(name: str):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_image_throughput_pairs_have_the_same_weights_and_a_consistent_ratio():
    res = _load("image_throughput").main(["--steps", "1", "--rounds", "2", "--warmup", "1",
                                          "--batch-size", "4"])
    for kind in ("vit", "resnet"):
        r = res[kind]
        assert r["params"] > 0 and len(r["rounds"]["ours"]) == len(r["rounds"]["hf"]) == 2
        assert r["ratio"] == pytest.approx(r["ours_img_s"] / r["hf_img_s"], rel=1e-2)


def test_image_trainer_reports_the_trainers_own_images_per_s():
    config = str(Path(__file__).resolve().parents[1] / "configs" / "vit-mae-cpu.yaml")
    res = _load("image_trainer").main(["--config", config, "--size", "8", "--channels", "1",
                                       "--images", "64", "--steps", "6", "--log-interval", "2", "--skip", "1",
                                       "--set", "train.batch_size=8", "--set", "model.patch_size=2",
                                       "--device", "cpu"])
    assert res["intervals_used"] == 2 and res["img_s_median"] > 0 and res["mfu_median"] is None


def test_qa_bench_splits_by_article_and_reports_em_f1_over_seeds():
    qa = _load("qa")
    articles = [{"title": f"a{i}", "paragraphs": [{"context": "x", "qas": [{"id": f"{i}"}] * (i % 3 + 1)}]}
                for i in range(48)]
    train, dev = qa.split_articles(articles)
    assert (len(train), len(dev)) == (36, 12) and qa.split_articles(articles) == (train, dev)
    assert {a["title"] for a in train}.isdisjoint(a["title"] for a in dev)
    assert qa.count_questions(train) + qa.count_questions(dev) == qa.count_questions(articles)
    rep = {"arms": [{"name": "pretrained", "kind": "pretrained"}, {"name": "scratch", "kind": "scratch"}],
           "budgets": [200],
           "results": [{"arm": a, "n": 200, "seed": s, "metric": f1, "val_exact_match": em, "val_f1": f1}
                       for a, s, em, f1 in [("pretrained", 0, 0.20, 0.30), ("pretrained", 1, 0.30, 0.40),
                                            ("scratch", 0, 0.05, 0.10), ("scratch", 1, 0.05, 0.20)]]}
    table = qa.report_table(rep, {"em": 11.0, "f1": 19.7})
    assert "| pretrained | 200 | 25.0 ± 7.1 | 35.0 ± 7.1 | 2 |" in table
    assert "| scratch | 200 | 5.0 ± 0.0 | 15.0 ± 7.1 | 2 |" in table
    assert "| pretrained | 200 | +20.0 ± 7.1 | +20.0 ± 0.0 |" in table  # paired by seed
    assert "19.7" in table and "+15.3 over the sliding-window baseline" in table
