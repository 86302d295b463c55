"""Speed features: document masking, activation checkpointing, batch prefetching, the auto batch-size
search."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.distributed import apply_activation_checkpointing
from pretrain.models.bert import Encoder
from pretrain.models.gpt import GPT
from pretrain.models.layers import document_ids
from pretrain.train import Prefetcher, auto_micro_batch, largest_fitting

EOT = 0


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, n_layer=2, d_model=32, n_head=4, vocab_size=50, max_seq_len=32)
    return (GPT(cfg) if arch == "gpt" else Encoder(cfg)).eval()


def test_document_ids():
    ids = torch.tensor([[5, 6, EOT, 7, EOT, EOT, 8], [EOT, 1, 2, 3, 4, 5, 6]])
    assert document_ids(ids, EOT).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


def _two_docs(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (2, 16), generator=g)
    ids[:, 6] = EOT  # document 1: positions 0..6, document 2: 7..15
    return ids


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_doc_mask_isolates_documents(arch):
    model = tiny(arch)
    a = _two_docs(1)
    b = a.clone()
    b[:, :6] = _two_docs(2)[:, :6]  # another first document, the same second one

    def out(ids, masked=True):
        with torch.no_grad():
            return model(ids, doc_ids=document_ids(ids, EOT) if masked else None)

    # the second document's logits do not depend on the first document's tokens ...
    torch.testing.assert_close(out(a)[:, 7:], out(b)[:, 7:], rtol=0, atol=1e-6)
    # ... they do without the mask
    assert (out(a, False)[:, 7:] - out(b, False)[:, 7:]).abs().max() > 1e-4
    # a document alone at the start of a sequence gets the logits it gets without any mask
    # (rotary positions are relative, so the second document alone matches too)
    torch.testing.assert_close(out(a)[:, 7:], out(a[:, 7:], False), rtol=1e-4, atol=1e-5)
    if arch == "gpt":
        torch.testing.assert_close(out(a)[:, :7], out(a[:, :7], False), rtol=1e-4, atol=1e-5)
    else:  # bidirectional: the first document does not see the second either
        c = a.clone()
        c[:, 7:] = _two_docs(3)[:, 7:]
        torch.testing.assert_close(out(a)[:, :7], out(c)[:, :7], rtol=0, atol=1e-6)


def test_doc_mask_objectives():
    """The objectives pass document ids built from the end-of-text token (CLM and MLM)."""
    from pretrain.objectives import CausalLM

    model = tiny("gpt")
    batch = torch.cat([_two_docs(1), torch.full((2, 1), 3)], dim=1)
    plain, masked = CausalLM().loss(model, batch, 0), CausalLM(EOT).loss(model, batch, 0)
    assert torch.isfinite(masked) and not torch.allclose(plain, masked)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_activation_checkpointing_same_loss_and_grads(arch):
    ref = tiny(arch).train()
    ckpt = apply_activation_checkpointing(copy.deepcopy(ref))
    assert ckpt.state_dict().keys() == ref.state_dict().keys()
    ids = _two_docs(4)
    for m in (ref, ckpt):
        out = m(ids, doc_ids=document_ids(ids, EOT)) if arch == "gpt" else m(ids)
        (out.float().square().mean()).backward()
    for (name, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # evaluation runs the plain blocks
        torch.testing.assert_close(ckpt(ids), ref(ids))


def test_largest_fitting_search():
    calls = []

    def fits_upto(n):
        def fits(b):
            calls.append(b)
            return b <= n
        return fits

    assert largest_fitting(fits_upto(37), 64) == 37
    assert len(calls) <= 12 and len(set(calls)) == len(calls)  # doubling then bisection, nothing twice
    assert largest_fitting(fits_upto(1000), 48) == 48
    assert largest_fitting(fits_upto(0), 64) == 0
    assert largest_fitting(fits_upto(5), 64, start=16) == 5  # too large a start bisects downwards
    calls.clear()
    largest_fitting(fits_upto(1000), 64)
    assert calls == [1, 2, 4, 8, 16, 32, 64]


def test_auto_micro_batch_keeps_the_global_batch():
    assert auto_micro_batch(48, lambda b: b <= 37) == (24, 2)
    assert auto_micro_batch(64, lambda b: b <= 5) == (4, 16)
    assert auto_micro_batch(32, lambda b: True) == (32, 1)
    assert auto_micro_batch(7, lambda b: b <= 6) == (1, 7)
    with pytest.raises(Exception, match="not even"):
        auto_micro_batch(8, lambda b: False)


class CountingLoader:
    def __init__(self, fail_at: int = -1):
        self.i, self.fail_at = 0, fail_at

    def next_batch(self):
        if self.i == self.fail_at:
            raise RuntimeError("broken shard")
        self.i += 1
        return torch.full((2, 3), self.i)

    def state_dict(self):
        return {"i": self.i}


@pytest.mark.parametrize("depth", [0, 3])
def test_prefetcher_state_is_the_consumed_one(depth):
    loader = CountingLoader()
    pf = Prefetcher(loader, torch.device("cpu"), depth)
    try:
        assert pf.state_dict() == {"i": 0}
        assert [int(pf.next()[0, 0]) for _ in range(2)] == [1, 2]
        deadline = time.time() + 5
        while depth and loader.i < 2 + depth and time.time() < deadline:
            time.sleep(0.01)  # let the thread run ahead
        assert loader.i >= 2 + (depth > 0)
        assert pf.state_dict() == {"i": 2}  # what was consumed, not what was prefetched
    finally:
        pf.close()


def test_prefetcher_raises_loader_errors_in_the_loop():
    pf = Prefetcher(CountingLoader(fail_at=1), torch.device("cpu"), 2)
    try:
        assert int(pf.next()[0, 0]) == 1
        with pytest.raises(RuntimeError, match="broken shard"):
            pf.next()
    finally:
        pf.close()


@pytest.mark.parametrize("n_layer", [1, 2])
def test_encoder_select_matches_dense(n_layer):
    """Encoder(select=) runs the last block on the selected positions only: the same outputs and gradients
    as the dense forward indexed afterwards (with padding and document masks too)."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="bert", n_layer=n_layer, d_model=32, n_head=4, vocab_size=50, max_seq_len=24)
    dense = Encoder(cfg).double()
    sparse = copy.deepcopy(dense)
    ids = torch.randint(1, 50, (3, 24))
    ids[:, 9] = EOT
    sel = torch.rand(3, 24) < 0.2
    sel[0, 3], sel[2] = True, False  # a row with nothing selected
    attn = torch.ones(3, 24, dtype=torch.bool)
    attn[1, 20:] = False
    kw = {"attention_mask": attn, "doc_ids": document_ids(ids, EOT)}
    a = dense.logits(dense(ids, return_hidden=True, **kw)[sel])
    b = sparse.logits(sparse(ids, return_hidden=True, select=sel, **kw))
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
