"""`pretrain eval RUN --tasks`: lm-evaluation-harness on a run, offline, on small local task definitions."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _corpus import sentences, tiny_text_run

from pretrain.cli import main

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def clm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    tiny_text_run(root, "clm", steps=20)
    return root / "run"


def _tasks(tmp_path) -> dict[str, object]:
    """Three local tasks (one per request type) over JSON Lines files."""
    choice = tmp_path / "choice.jsonl"
    docs = sentences(12, seed=3)
    choice.write_text("".join(json.dumps({"text": " ".join(d.split()[:3]), "choices": [
        " " + " ".join(d.split()[3:]), " zzq xxv qqz"], "label": 0}) + "\n" for d in docs))
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"text": d, "answer": d.split()[-1]}) + "\n" for d in docs[:4]))
    common = "test_split: test\ndataset_path: json\n"
    (tmp_path / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {choice}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{text}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {plain}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (tmp_path / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {plain}\n"
        "output_type: generate_until\ndoc_to_text: '{{text}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n")
    return {"choice": choice}


def test_harness_tasks_on_a_run(clm_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    _tasks(tmp_path)
    capsys.readouterr()
    assert main(["eval", str(clm_run), "--tasks", "tiny_choice,tiny_ppl,tiny_gen", "--include-path",
                 str(tmp_path), "--limit", "10", "--num-fewshot", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    t = res["tasks"]
    assert set(t) == {"tiny_choice", "tiny_ppl", "tiny_gen"}
    assert 0.0 <= t["tiny_choice"]["acc"] <= 1.0 and res["n_samples"]["tiny_choice"] == 10
    assert t["tiny_ppl"]["word_perplexity"] > 1 and t["tiny_ppl"]["bits_per_byte"] > 0
    assert t["tiny_gen"]["exact_match"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    # a task YAML file named directly; the printed summary
    assert main(["eval", str(clm_run), "--tasks", str(tmp_path / "tiny_choice.yaml"), "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "  tiny_choice: acc " in out and "(4 documents)" in out and "sample_len" not in out


def test_loglikelihood_is_the_models(clm_run):
    """The wrapper's figures are the model's own log-probabilities, context handled as lm_eval's HFLM."""
    from lm_eval.api.instance import Instance

    from pretrain.checkpoint import load_pretrained
    from pretrain.harness import lm_class

    lm = lm_class()(str(clm_run), device="cpu", batch_size=2, dtype="fp32")
    model, _, tok, _ = load_pretrained(clm_run, "cpu", part="whole")
    ctx, cont = "The king", " spoke to the queen"
    reqs = [Instance("loglikelihood", {}, (c, x), 0) for c, x in ((ctx, cont), ("", "The king"),
                                                                   (ctx + " ", "spoke"))]
    (lp, greedy), (lp_empty, _), (lp_space, _) = lm.loglikelihood(reqs)
    a, b = tok.encode(ctx), tok.encode(ctx + cont)[len(tok.encode(ctx)):]
    with torch.no_grad():
        logp = model(torch.tensor([a + b]))[0].float().log_softmax(-1)
    want = sum(float(logp[len(a) - 1 + i, t]) for i, t in enumerate(b))
    assert lp == pytest.approx(want, rel=1e-5) and lp < 0 and isinstance(greedy, bool)
    # an empty context is the end-of-document token; a context's trailing space moves to the continuation
    ids = tok.encode("The king")
    with torch.no_grad():
        logp = model(torch.tensor([[tok.eot_id, *ids]]))[0].float().log_softmax(-1)
    assert lp_empty == pytest.approx(sum(float(logp[i, t]) for i, t in enumerate(ids)), rel=1e-5)
    (moved, _), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, " spoke"), 0)])
    assert lp_space == pytest.approx(moved)
    # rolling: a text longer than the context is scored in windows, every token once
    long_text = " ".join(sentences(40, seed=1))
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long_text,), 0)])
    assert len(tok.encode(long_text)) > lm.ctx and math.isfinite(rolled) and rolled < 0
    (gen,) = lm.generate_until([Instance("generate_until", {}, ("The king", {"until": ["."],
                                                                             "max_gen_toks": 40}), 0)])
    assert "." not in gen


def test_bad_requests_are_clear_errors(clm_run, tmp_path, capsys, monkeypatch):
    import lm_eval.tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _tasks(tmp_path)
    real = lm_eval.tasks.TaskManager  # (indexing the harness's own thousands of tasks takes seconds)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kw: real(**{**kw, "include_defaults": False}))
    assert main(["eval", str(clm_run), "--tasks", "tiny_choise", "--include-path", str(tmp_path)]) == 2
    assert "unknown lm-evaluation-harness task(s): tiny_choise (did you mean: tiny_choise → tiny_choice?)" \
        in capsys.readouterr().err
    assert main(["eval", str(clm_run), "--tasks", "x", "--rec"]) == 2
    assert "--rec: not with --tasks" in capsys.readouterr().err
    assert main(["eval", str(clm_run), "--limit", "3"]) == 2
    assert "apply to --tasks only" in capsys.readouterr().err
    assert main(["eval", str(clm_run), "--tasks", str(tmp_path / "missing.yaml")]) == 2
    assert "task file not found" in capsys.readouterr().err


def test_masked_lm_runs_are_refused(tmp_path, capsys):
    run = tiny_text_run(tmp_path, "mlm", steps=2)
    assert main(["eval", str(run), "--tasks", "anything"]) == 2
    assert "needs a causal-LM (objective clm) run" in capsys.readouterr().err


def test_missing_lm_eval_names_the_extra(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["eval", "RUN", "--tasks", "hellaswag"]) == 2
    assert "pip install 'pretrain[eval]'" in capsys.readouterr().err
