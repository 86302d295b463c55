"""Recommendations: ranking metrics on hand-made scores, the baselines, full ranking with the history
excluded, a run trained on item sequences (causal and masked) beating popularity on a learnable log,
`recommend`, `embed --items`, exact resume, and clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from _corpus import TINY_TRAIN, overrides, shift_log

from pretrain import PretrainError
from pretrain.cli import main
from pretrain.evaluation import evaluate_scores, rank_of_target, ranking_metrics
from pretrain.recommend import ItemKNN, popularity_scores, recommend

# ---------------------------------------------------------------------------------------------- metrics


def test_ranking_metrics_on_hand_made_ranks():
    m = ranking_metrics(np.array([1, 2, 11, 4]), k=10)
    assert m["hr@10"] == pytest.approx(0.75)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 0 + 1 / math.log2(5)) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 11 + 1 / 4) / 4)
    assert ranking_metrics(np.array([3]), k=2) == {"hr@2": 0.0, "ndcg@2": 0.0, "mrr": pytest.approx(1 / 3)}
    with pytest.raises(PretrainError):
        ranking_metrics(np.array([]))


def test_rank_of_target_excludes_and_breaks_ties_by_id():
    scores = np.array([[0.9, 0.1, 0.5, 0.7, 0.5],
                       [0.9, 0.1, 0.5, 0.7, 0.5]])
    # row 0: target 2 (0.5); above it 0.9 and 0.7, tie with id 4 (higher id: after) → rank 3
    # row 1: target 4 (0.5), ids 0 and 2 excluded → above: 0.7; tie with id 2 excluded → rank 2
    ranks = rank_of_target(scores, np.array([2, 4]), [np.array([], np.int64), np.array([0, 2])])
    assert ranks.tolist() == [3, 2]
    # an excluded target stays a candidate
    assert rank_of_target(scores[:1], np.array([0]), [np.array([0, 3])]).tolist() == [1]


def test_full_ranking_excludes_the_history_and_the_specials():
    v = 10  # ids 0-3 special, items 4..9
    scores = np.tile(np.arange(v, dtype=float)[::-1], (2, 1))  # special ids score highest, then 4, 5, ...
    hist = [np.array([4, 5]), np.array([6])]
    # target 6 after [4, 5]: 4 and 5 seen, specials never → rank 1; target 9 after [6]: 4 5 7 8 above → 5
    m = evaluate_scores(lambda hs: scores[:len(hs)], hist, np.array([6, 9]), v, k=1)
    assert m["hr@1"] == 0.5 and m["mrr"] == pytest.approx((1 + 1 / 5) / 2)
    # sampled negatives: the target among 2 unseen items → rank at most 3
    m = evaluate_scores(lambda hs: scores[:len(hs)], hist, np.array([6, 9]), v, k=3, negatives=2)
    assert m["hr@3"] == 1.0


def test_paired_difference_and_its_interval():
    from pretrain.evaluation import ndcg_at, paired_difference

    assert ndcg_at(np.array([1, 3, 11]), 10) == pytest.approx([1.0, 0.5, 0.0])
    same = paired_difference(np.ones(50), np.ones(50))
    assert same == {"mean": 0.0, "ci95": [0.0, 0.0]}
    rng = np.random.default_rng(0)
    a = rng.random(400)
    d = paired_difference(a + 0.1, a)  # a constant gain: no doubt about it
    assert d["mean"] == pytest.approx(0.1) and d["ci95"] == pytest.approx([0.1, 0.1])
    noisy = paired_difference(rng.random(400), rng.random(400))
    assert noisy["ci95"][0] < 0 < noisy["ci95"][1]


def test_popularity_counts_each_history_once():
    pop = popularity_scores([np.array([4, 4, 5]), np.array([5, 6])], 8)
    assert pop.tolist() == [0, 0, 0, 0, 1, 2, 1, 0]


def test_item_knn_scores_co_occurring_items():
    # 4 and 5 always together, 6 with 7; a user with 4 gets 5 first
    hists = [np.array([4, 5]), np.array([4, 5]), np.array([6, 7]), np.array([6, 7, 5])]
    knn = ItemKNN(hists, 8, neighbours=2)
    s = knn.scores([np.array([4])])[0]
    assert s[5] > 0 and s[6] == 0 and s[7] == 0 and s[4] == 0
    assert np.argmax(knn.scores([np.array([6])])[0]) == 7
    assert knn.sim.shape == (8, 8) and (knn.sim.getnnz(1) <= 2).all()


# ------------------------------------------------------------------------------------------ trained runs

REC_TRAIN = {**TINY_TRAIN, "data": {"seq_len": 16, "doc_mask": True},
             "train": {**TINY_TRAIN["train"], "max_steps": 160, "batch_size": 8, "eval_interval": 80,
                       "ckpt_interval": 80}}
OBJ = {"clm": [], "mlm": ["--objective", "mlm", "--model.arch", "bert", "--mlm.mask_prob", "0.3"]}


@pytest.fixture(scope="module")
def shift_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    log = shift_log(root / "log.csv")
    (root / "items.csv").write_text("item_id,title\n" + "".join(f"i{i},Item {i}\n" for i in range(30)))
    assert main(["prepare", str(log), "--interactions", "--items", str(root / "items.csv"),
                 "--out", str(root / "data")]) == 0
    return root / "data"


def train_args(objective: str, data) -> list[str]:
    return [*overrides(REC_TRAIN), *OBJ[objective], "--data.path", str(data), "--quiet"]


@pytest.fixture(scope="module", params=sorted(OBJ))
def rec_run(request, tmp_path_factory, shift_data):
    run = tmp_path_factory.mktemp(f"run_{request.param}") / "run"
    assert main(["train", "--out", str(run), *train_args(request.param, shift_data)]) == 0
    return request.param, run


def test_a_trained_run_ranks_the_next_item_far_above_popularity(rec_run, capsys):
    objective, run = rec_run
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_ndcg@10" in r for r in rows)  # ranking metrics of the validation items in training
    capsys.readouterr()
    assert main(["eval", str(run), "--rec", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["split"] == "test" and res["users"] == 60 and res["ranking"] == "full"
    assert res["objective"] == objective
    # the next item follows from the last one; popularity is flat: about 10 of the 20-odd unseen items
    assert res["model"]["hr@10"] >= 0.9 and res["model"]["ndcg@10"] >= 0.6
    assert res["model"]["ndcg@10"] > 2 * res["popularity"]["ndcg@10"]
    assert set(res["item_knn"]) == {"hr@10", "ndcg@10", "mrr"}
    gain = res["paired"]["ndcg@10_minus_popularity"]
    assert gain["mean"] == pytest.approx(res["model"]["ndcg@10"] - res["popularity"]["ndcg@10"])
    assert gain["ci95"][0] > 0  # 60 users are enough to be sure of this one
    assert main(["eval", str(run), "--rec", "--split", "val", "--negatives", "5", "--json"]) == 0
    sampled = json.loads(capsys.readouterr().out)
    assert sampled["ranking"] == "sampled (5 negatives)" and sampled["split"] == "val"
    assert main(["eval", str(run), "--rec"]) == 0
    out = capsys.readouterr().out
    assert "popularity" in out and "item-kNN" in out and "NDCG@10" in out


def test_recommendations_leave_out_the_history(rec_run, capsys):
    objective, run = rec_run
    res = recommend(run, history="i3,i4,i5", k=5)
    got = [r["item"] for r in res["recommendations"]]
    assert len(got) == 5 and not {"i3", "i4", "i5"} & set(got)
    if objective == "clm":  # the walk goes on (the tiny masked LM learns it for long histories only)
        assert got[0] == "i6"
    assert all(r["title"] == f"Item {r['item'][1:]}" for r in res["recommendations"])
    assert all(0 < r["score"] <= 1 for r in res["recommendations"])
    seen = recommend(run, history="i3,i4,i5", k=30, keep_seen=True)
    assert len(seen["recommendations"]) == 30  # every item (the specials never)
    by_user = recommend(run, user="u0", k=3)
    assert len(by_user["history"]) >= 6 and len(by_user["recommendations"]) == 3
    assert main(["recommend", str(run), "--history", "i1,i2", "--k", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["recommendations"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--history", "i1,nope,i2,zz"], "unknown item ids in --history: nope, zz"),
    (["--history", ","], "--history is empty"),
    (["--user", "nobody"], "unknown user 'nobody'"),
    ([], "give either --history"),
])
def test_recommend_errors(rec_run, capsys, args, message):
    _, run = rec_run
    assert main(["recommend", str(run), *args]) == 2
    assert message in capsys.readouterr().err


def test_embed_items_writes_vectors_and_neighbours(rec_run, tmp_path, capsys):
    _, run = rec_run
    out = tmp_path / "items.parquet"
    assert main(["embed", str(run), "--items", "--out", str(out), "--neighbours", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    t = pq.read_table(out).to_pydict()
    assert res["rows"] == len(t["item"]) == 30 and set(t["item"]) == {f"i{i}" for i in range(30)}
    assert len(t["embedding"][0]) == res["dim"] == 32
    assert all(len(n) == 3 and item not in n for item, n in zip(t["item"], t["neighbours"]))
    assert t["title"][t["item"].index("i7")] == "Item 7"
    sims = np.array(t["similarities"])
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # nearest first
    assert main(["embed", str(run), "--items", "--out", str(tmp_path / "x.npy")]) == 0
    assert np.load(tmp_path / "x.npy").shape == (30, 32)


def test_item_sequence_run_resumes_exactly(tmp_path, shift_data):
    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}

    args = train_args("clm", shift_data)
    assert main(["train", "--out", str(tmp_path / "ref"), *args, "--train.max_steps", "24"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *args, "--train.max_steps", "24",
                 "--train.stop_at_step", "13"]) == 0
    assert max(losses(run)) == 13
    assert main(["train", "--resume", str(run), "--train.stop_at_step", "0", "--quiet"]) == 0
    assert losses(run) == losses(tmp_path / "ref")


def test_eval_rec_needs_an_item_run(tmp_path, capsys):
    from _corpus import tiny_text_run

    run = tiny_text_run(tmp_path, "clm", steps=2)
    assert main(["eval", str(run), "--rec"]) == 2
    assert "not trained on item sequences" in capsys.readouterr().err
    assert main(["eval", str(run), "--k", "5"]) == 2
    assert "--k applies to --rec only" in capsys.readouterr().err


def test_item_probe_reads_item_ids_and_has_a_random_control(rec_run, tmp_path, capsys):
    _, run = rec_run
    # label: which half of the ring an item is on (neighbours in the walk share it)
    rows = [(f"i{i}", "low" if i < 15 else "high") for i in range(30)]
    (tmp_path / "tr.csv").write_text("item,half\n" + "".join(f"{a},{b}\n" for a, b in rows[::2]))
    (tmp_path / "va.csv").write_text("item,half\n" + "".join(f"{a},{b}\n" for a, b in rows[1::2]))
    common = ["probe", str(run), "--train", str(tmp_path / "tr.csv"), "--valid", str(tmp_path / "va.csv"),
              "--text-column", "item", "--label-column", "half", "--json"]
    assert main(common) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["train_examples"] == res["valid_examples"] == 15 and res["dim"] == 32
    assert 0 <= res["accuracy"] <= 1 and "roc_auc" in res
    assert main([*common, "--random-init"]) == 0
    control = json.loads(capsys.readouterr().out)
    assert control["accuracy"] != res["accuracy"] or control["roc_auc"] != res["roc_auc"]
    (tmp_path / "bad.csv").write_text("item,half\ni1,low\nnope,high\n")
    assert main([*common[:3], str(tmp_path / "bad.csv"), *common[4:]]) == 2
    err = capsys.readouterr().err
    assert "1 item id(s) in column 'item' are not in the run's vocabulary, e.g. nope" in err


def test_item_knn_decay_favours_the_latest_items():
    hists = [np.array([4, 5]), np.array([6, 7]), np.array([4, 5]), np.array([6, 7])]
    knn = ItemKNN(hists, 8)
    history = [np.array([4, 6])]  # 6 is the latest
    flat = knn.scores(history)[0]
    assert flat[5] == pytest.approx(flat[7])
    knn.decay = 0.5
    s = knn.scores(history)[0]
    assert s[7] == pytest.approx(2 * s[5])
    # an item seen twice counts once, at its latest position
    assert knn.scores([np.array([6, 4, 6])])[0][7] == pytest.approx(s[7])


def test_an_exported_item_model_recommends_the_same_in_transformers(rec_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    objective, run = rec_run
    if objective != "clm":
        pytest.skip("the causal item model exports as LlamaForCausalLM (the masked one as a fill-mask model)")
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok("i3 i4 i5", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    logits[:4] = -torch.inf  # the specials
    logits[ids[0]] = -torch.inf  # the history
    theirs = tok.convert_ids_to_tokens(logits.topk(5).indices.tolist())
    ours = [r["item"] for r in recommend(run, history="i3,i4,i5", k=5, device="cpu")["recommendations"]]
    assert theirs == ours


@pytest.mark.parametrize("preset", ["sasrec-cpu", "bert4rec-cpu", "sasrec-gpu", "bert4rec-gpu"])
def test_the_item_presets_train_on_an_interactions_directory(preset, shift_data, tmp_path):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / f"{preset}.yaml"
    run = tmp_path / "run"
    assert main(["train", str(config), "--data.path", str(shift_data), "--out", str(run),
                 "--data.seq_len", "16", "--model.d_model", "32", "--train.batch_size", "4",
                 "--train.max_steps", "3", "--train.warmup_steps", "1", "--train.eval_interval", "3",
                 "--train.compile", "false", "--train.plot", "false", "--quiet"]) == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val_loss", "val_ndcg@10", "val_hr@10", "val_mrr"} <= set(last)
    assert (run / "items.json").is_file()  # the item metadata travels with the run
