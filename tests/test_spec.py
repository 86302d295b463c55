"""Architecture specs: what the system knows about an architecture, asked of its spec alone.

A toy architecture that no module outside its own spec knows of is registered here, then trained (with
Muon, so the spec's parameter split is used), checkpointed, resumed exactly, and exported / imported in a
Hugging Face-style layout — all through the spec."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _corpus import write_corpus
from safetensors.torch import load_file

from pretrain.checkpoint import load_pretrained
from pretrain.config import ConfigError, ModelConfig, load_config
from pretrain.data.prepare import prepare
from pretrain.export import export_hf, load_hf
from pretrain.models import build_model, get_spec, spec_of
from pretrain.models.spec import ArchSpec, HFMapping, arch_names, register, unregister
from pretrain.train import train

ROOT = Path(__file__).resolve().parents[1]


class ToyBlock(nn.Module):
    """Causal without attention: each position mixes in the previous position's features."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(2 * d, d)

    def forward(self, x):
        prev = F.pad(x, (0, 0, 1, 0))[:, :-1]
        return x + self.mix(torch.cat([self.norm(x), prev], dim=-1))


class Toy(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.stack = nn.ModuleList(ToyBlock(cfg.d_model) for _ in range(cfg.n_layer))
        self.out = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, idx, return_hidden: bool = False, **_):
        x = self.tok(idx)
        for block in self.stack:
            x = block(x)
        return x if return_hidden else self.out(x)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok.weight.numel() if non_embedding else n


def _to_hf(sd, cfg):
    return {"toy." + k: v for k, v in sd.items()}


def _from_hf(sd, cfg):
    return {k.removeprefix("toy."): v for k, v in sd.items()}


TOY = ArchSpec(
    name="toy", build=Toy, objectives=("clm",), blocks="stack", embeddings=("tok",), head="out",
    lora_targets=("mix",), description="toy causal model",
    hf=HFMapping(architecture="ToyForCausalLM", auto_class="AutoModelForCausalLM",
                 pipeline_tag="text-generation",
                 config=lambda cfg, special: {"architectures": ["ToyForCausalLM"], "model_type": "toy",
                                              "hidden": cfg.d_model, "layers": cfg.n_layer,
                                              "vocab": cfg.vocab_size, "eos_token_id": special.get("eot_id")},
                 to_hf=_to_hf, token_roles={"eos_token": "eot_id"}, model_types=("toy",),
                 config_from_hf=lambda c: {"arch": "toy", "d_model": c["hidden"], "n_layer": c["layers"],
                                           "n_head": 1, "vocab_size": c["vocab"], "max_seq_len": 32,
                                           "tie_embeddings": False},
                 from_hf=_from_hf),
)


@pytest.fixture
def toy():
    register(TOY)
    yield TOY
    unregister("toy")


def test_builtin_specs_describe_their_models(tiny_model_cfg):
    assert arch_names()[:3] == ["gpt", "bert", "gpt2"]
    for arch in ("gpt", "bert", "gpt2"):
        spec = get_spec(arch)
        model = build_model(tiny_model_cfg(arch=arch, tie_embeddings=False))
        assert spec_of(model) is spec
        names = dict(model.named_parameters())
        assert len(spec.block_list(model)) == 2
        assert isinstance(spec.output_head(model), nn.Linear)
        assert spec.output_head(model).weight.shape[0] == 50  # onto the vocabulary
        emb = [n for n in names if spec.is_embedding(n)]
        assert emb and all(not spec.is_hidden_matrix(n, names[n]) for n in emb)
        assert not spec.is_hidden_matrix(f"{spec.head}.weight", names[f"{spec.head}.weight"])
        # every LoRA target names linear layers inside the blocks
        blocks = spec.block_list(model)
        for target in spec.lora_targets:
            found = [m for b in blocks for n, m in b.named_modules() if n.split(".")[-1] == target]
            assert found and all(isinstance(m, nn.Linear) for m in found), (arch, target)
        # layer-wise depth: embeddings 0, block i -> i + 1, the rest the top
        block_param = next(n for n in names if n.startswith(f"{spec.blocks}.1."))
        assert spec.layer_of(emb[0], 2) == 0 and spec.layer_of(block_param, 2) == 2
        assert spec.layer_of("backbone." + block_param, 2) == 2
        assert spec.flops_per_token(model, 16) > 6 * model.num_params(non_embedding=True)


def test_unknown_arch_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'bert'"):
        ModelConfig(arch="bret")
    with pytest.raises(ConfigError, match="trains a 'bert' model"):
        load_config(None, ["--objective", "mlm"])


def test_toy_architecture_trains_resumes_and_exports_through_its_spec(toy, tmp_path):
    write_corpus(tmp_path / "corpus", n_docs=6)
    prepare([str(tmp_path / "corpus")], tmp_path / "data", tokenizer="char", val_fraction=0.2,
            log=lambda *_: None)
    base = {"model": {"arch": "toy", "n_layer": 2, "n_head": 1, "d_model": 16, "tie_embeddings": False},
            "data": {"path": str(tmp_path / "data"), "seq_len": 16},
            "train": {"batch_size": 4, "max_steps": 12, "lr": 3e-3, "warmup_steps": 2, "eval_interval": 6,
                      "eval_batches": 2, "log_interval": 1, "ckpt_interval": 0, "plot": False, "threads": 1,
                      "optimizer": "muon", "dtype": "fp32", "device": "cpu", "compile": False}}
    whole = train(load_config(None, base), tmp_path / "whole", quiet=True)
    assert whole["step"] == 12 and whole["val_loss"] < 3.9  # learns from ~ln(vocab)

    # the same run cut at step 5 and resumed: the same losses
    part = {**base, "train": {**base["train"], "stop_at_step": 5}}
    assert train(load_config(None, part), tmp_path / "cut", quiet=True)["step"] == 5
    resumed = train(load_config(None, base), tmp_path / "cut", quiet=True)
    assert resumed["step"] == 12

    def losses(run):
        return [json.loads(x)["train_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "whole"), abs=1e-6)

    # export through the spec's mapping, and back
    res = export_hf(tmp_path / "whole", tmp_path / "hf")
    assert res["architecture"] == "ToyForCausalLM"
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["model_type"] == "toy" and conf["layers"] == 2
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    section, ours = load_hf(tmp_path / "hf")
    assert section["arch"] == "toy"
    model = build_model(ModelConfig(**section))
    model.load_state_dict(ours)  # strict: every tensor, and no other
    assert set(sd) == {"toy." + k for k in model.state_dict()}
    trained, _, _, _ = load_pretrained(tmp_path / "whole")
    assert all(torch.equal(v, ours[k]) for k, v in trained.state_dict().items())
    assert json.loads((tmp_path / "hf" / "special_tokens_map.json").read_text()) == {
        "eos_token": "<|endoftext|>"}


def test_nothing_outside_models_branches_on_an_architecture_name():
    out = subprocess.run(["grep", "-rn", "arch ==", "pretrain/"], cwd=ROOT, capture_output=True,
                         text=True).stdout
    assert [ln for ln in out.splitlines() if not ln.startswith("pretrain/models/")] == []


@pytest.mark.parametrize("arch", ["gpt", "bert", "gpt2"])
def test_fine_tuning_groups_follow_the_spec(arch, tiny_model_cfg):
    """Layer-wise depth and weight decay come from the spec: no decay on any input embedding (GPT-2's wte and
    wpe too: the old name test, "emb" in the name, missed them), nor on the head, gains or biases."""
    from pretrain.config import FinetuneConfig
    from pretrain.finetune.loop import param_groups
    from pretrain.finetune.model import TaskModel

    backbone = build_model(tiny_model_cfg(arch=arch))
    model = TaskModel(backbone, 32, 2, "mean", get_spec(arch).bidirectional)
    groups = param_groups(model, FinetuneConfig(layer_decay=0.5, weight_decay=0.1), 2)
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    for name, p in model.named_parameters():
        inside = name.removeprefix("backbone.")
        if get_spec(arch).is_embedding(inside) or p.dim() < 2 or name.startswith("classifier."):
            assert id(p) not in decayed, name
        else:
            assert id(p) in decayed, name
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    emb = next(p for n, p in model.named_parameters()
               if get_spec(arch).is_embedding(n.removeprefix("backbone.")))
    assert lr_of[id(emb)] == pytest.approx(FinetuneConfig().lr * 0.5 ** 2)  # the bottom of layer-wise decay
