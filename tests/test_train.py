"""kvtier_bench.train without training a model: the batches it builds and the duplicate-token head start."""

from __future__ import annotations

import random

import pytest

from kvtier_bench import train

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

USER, YES, NO, BOS = 4, 5, 6, 0


def test_quote_rows_copy_the_document_and_lookup_answers_are_right() -> None:
    stream = list(range(100, 4000))
    random.Random(0).shuffle(stream)
    spec = train.TrainSpec(seq_len=64, batch_size=20, quote_fraction=0.5, lookup_fraction=0.5, lm_fraction=0.0,
                           quote_len=(4, 12))
    rows, masks = train.make_batch(random.Random(1), stream, spec, BOS, (USER, YES, NO))
    assert all(len(r) == 64 for r in rows) and all(len(m) == 63 for m in masks)
    for row, mask in zip(rows, masks, strict=True):
        doc = row[1:33]
        targets = [row[p + 1] for p in range(63) if mask[p]]
        assert targets, "every quote or lookup row has targets"
        if YES in row or NO in row:  # lookup row: the answer says whether the asked token is in the document
            for p in range(63):
                if mask[p]:
                    assert row[p - 1] == USER and row[p + 1] == (YES if row[p] in doc else NO)
        else:  # quote row: every target token is the document's continuation of the previous one
            assert all(t in doc for t in targets)


def test_matching_heads_make_a_token_attend_to_its_copies() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = train.TrainSpec()
    config = LlamaConfig(vocab_size=512, hidden_size=spec.hidden_size, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
                         head_dim=spec.hidden_size // spec.num_attention_heads, attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    train.init_matching_heads(model, spec)
    ids = torch.tensor([[7] + list(range(100, 400)) + [42] + list(range(400, 500)) + [42]])
    with torch.no_grad():
        attn = model(input_ids=ids, output_attentions=True).attentions[0][0, :, -1]  # last query, all heads
    copy = 301  # the earlier 42, 101 positions back
    others = attn[:, 1:copy].mean()
    assert float(attn[:, copy].min()) > 20 * float(others)
