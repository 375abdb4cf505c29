"""Hugging Face transformers built from a config (random init, no download) round trip through every stage."""

import pytest
import torch

import deepshrink
from deepshrink.parametrizations import masks, plain_state_dict
from deepshrink.compress import compress_model
from deepshrink.format import open_file, read_file
from deepshrink.layers import select_weights
from deepshrink.prune import PruneConfig, prune_model
from deepshrink.quantize import QuantizeConfig, quantize_model

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install deepshrink[hf])")

TINY = dict(vocab_size=50, num_hidden_layers=2, num_attention_heads=2)


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=16, intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     **TINY)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def round_trip(build, tmp_path):
    model = build()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    refs = select_weights(model)
    big = {n for n, p in model.named_parameters(remove_duplicate=False) if p.is_floating_point() and p.dim() >= 2}
    assert {n for r in refs for n in r.names} == big
    prune_model(model, PruneConfig(q=60))
    for fqn, mask in masks(model).items():
        assert mask.float().mean().item() == pytest.approx(0.4, abs=0.01), fqn
    quantize_model(model, QuantizeConfig(bits=4))
    path = tmp_path / "m.dsz"
    report = compress_model(model, path)
    header, stored = read_file(path)
    expected, _ = plain_state_dict(model)
    decoded = open_file(path).with_aliases(stored)
    assert decoded.keys() == expected.keys()
    assert all(torch.equal(decoded[k], v) for k, v in expected.items())
    loaded = deepshrink.load(path, model=build())
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    return model, loaded, header, report


def test_tiny_bert_round_trip(tmp_path):
    model, _, header, report = round_trip(tiny_bert, tmp_path)
    kinds = {r.fqn: r.kind for r in select_weights(model)}
    assert kinds["bert.embeddings.word_embeddings.weight"] == "embedding"
    assert kinds["bert.encoder.layer.0.attention.self.query.weight"] == "fc"
    assert report.ratio > 3


def test_tiny_gpt2_round_trip_stores_the_tied_embedding_once(tmp_path):
    model, loaded, header, _ = round_trip(tiny_gpt2, tmp_path)
    assert {r.kind for r in select_weights(model)} == {"embedding", "fc"}  # Conv1D is fc
    assert "lm_head.weight" not in header["tensors"]
    assert header["tensors"]["transformer.wte.weight"]["codec"] in ("deep_compression", "cabac")  # coded
    assert header["meta"]["tied_weights"] == {"lm_head.weight": "transformer.wte.weight"}
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
