"""Packing a causal LM's examples (train.packing, jobs.data.pack) and grouping rows by length
(train.group_by_length, jobs.train.epoch_plan): each judged against the unpacked, unsorted computation."""

import random

import datasets
import pytest
import torch

from jobs import data as D
from jobs.evaluation import _batches, collate, fetch, forward, packing_problem, per_example_loss
from jobs.recipe import parse_recipe
from jobs.train import epoch_plan

MAX_LEN = 480


def instruction_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while seven green parrots sing near the river".split()
    return [{"instruction": " ".join(rng.choices(words, k=rng.randint(1, 8))),
             "output": " ".join(rng.choices(words, k=rng.randint(1, 12)))} for _ in range(n)]


@pytest.fixture(scope="module")
def examples(tokenizer, tmp_path_factory):
    r = parse_recipe(f"name: p\nmodel:\n  name: m\ntask: causal_lm\ndata:\n  train: x.jsonl\n  format: instruction\n"
                     f"  max_seq_len: {MAX_LEN}\n", base_dir=tmp_path_factory.mktemp("p"), env={})
    sp = D.Split("train", datasets.Dataset.from_list(instruction_rows(60)), "x")
    return D.tokenize_split(r, tokenizer, sp)


def model(path, impl: str):
    """The tiny Llama, random weights (seeded), with the attention implementation asked for."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), attn_implementation=impl).eval()


def test_packs_hold_every_example_once_whole_within_max_len(examples):
    packed, sizes = D.pack(examples, MAX_LEN, seed=3)
    assert sum(sizes) == len(examples) and len(packed) == len(sizes) < len(examples) / 2
    cols = packed.to_dict()
    assert max(len(x) for x in cols["input_ids"]) <= MAX_LEN
    # every example's tokens appear once, whole and in order, where its positions restart at 0
    by_content = {c: i for i, c in enumerate(examples["content"])}
    seen = []
    for ids, labels, pos, contents, units in zip(cols["input_ids"], cols["labels"], cols["position_ids"],
                                                 cols["content"], cols["units"]):
        starts = [t for t, p in enumerate(pos) if p == 0] + [len(pos)]
        assert len(starts) - 1 == len(contents)
        assert pos == [p for a, b in zip(starts, starts[1:]) for p in range(b - a)]
        for (a, b), c in zip(zip(starts, starts[1:]), contents):
            ex = examples[by_content[c]]
            assert ids[a:b] == ex["input_ids"]
            assert labels[a:b] == [-100] + ex["labels"][1:]  # nothing before it in its example predicts the first
            seen.append(by_content[c])
        assert units == sum(examples[by_content[c]]["units"] for c in contents)
    assert sorted(seen) == list(range(len(examples)))
    assert D.pack(examples, MAX_LEN, seed=3)[0].to_dict() == cols  # the same seed, the same packs


def test_best_fit_fills_bins_as_well_as_the_lower_bound_allows():
    rng = random.Random(1)
    lengths = [rng.randint(1, 40) for _ in range(2000)]
    bins = D._best_fit(lengths, 64, seed=0)
    assert sorted(j for b in bins for j in b) == list(range(2000))
    assert all(sum(lengths[j] for j in b) <= 64 for b in bins)
    lower = -(-sum(lengths) // 64)  # no packing can use fewer bins
    assert len(bins) <= 1.03 * lower, (len(bins), lower)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_the_packed_loss_is_the_unpacked_loss_and_no_token_sees_another_example(examples, tiny_llama_dir, impl):
    """The summed loss of a packed batch equals the sum of the same examples' losses one example a row (to 1e-5),
    and each example's logits inside a pack are its logits alone: a change to the example before it changes none
    of them (while a change inside the example does change its later logits, so the test can see attention)."""
    m = model(tiny_llama_dir, impl)
    packed, sizes = D.pack(examples, MAX_LEN, seed=0)
    rows = fetch(packed, list(range(6)))
    with torch.no_grad():
        packed_loss = per_example_loss(m, collate(rows, 0, "causal_lm", "cpu"), "causal_lm")
        by_content = {c: i for i, c in enumerate(examples["content"])}
        members = [by_content[c] for r in packed.select(range(6))["content"] for c in r]
        alone = per_example_loss(m, collate(fetch(examples, members), 0, "causal_lm", "cpu"), "causal_lm")
    assert packed_loss.sum().item() == pytest.approx(alone.sum().item(), rel=1e-5)
    assert sum(r["units"] for r in rows) == sum(examples[j]["units"] for j in members)

    row = next(r for r in rows if r["position_ids"].count(0) >= 2)  # a pack of two examples or more
    starts = [t for t, p in enumerate(row["position_ids"]) if p == 0]
    a, b = starts[1], (starts[2] if len(starts) > 2 else len(row["input_ids"]))

    def logits(ids):
        batch = collate([{**row, "input_ids": ids}], 0, "causal_lm", "cpu")
        with torch.no_grad():
            return forward(m, batch)[0]

    base = logits(row["input_ids"])
    with torch.no_grad():
        alone_logits = m(input_ids=torch.tensor([row["input_ids"][a:b]])).logits[0]
    assert torch.allclose(base[a:b], alone_logits, atol=1e-5), "an example's logits in a pack are its own"
    before = list(row["input_ids"])
    before[:a] = [(t + 7) % 500 + 10 for t in before[:a]]  # the examples before it, changed
    assert torch.allclose(logits(before)[a:b], base[a:b], atol=1e-6), "a token attended across a boundary"
    inside = list(row["input_ids"])
    inside[a] = (inside[a] + 7) % 500 + 10
    assert not torch.allclose(logits(inside)[a + 1:b], base[a + 1:b], atol=1e-4) or b - a == 1


def test_grouping_by_length_keeps_each_row_once_and_the_steps_independent_of_the_worker_count():
    rng = random.Random(0)
    lengths = [rng.randint(2, 120) for _ in range(1000)]
    plain = epoch_plan(1000, seed=5, epoch=0, world=1, batch=16, accum=1)
    grouped = {w: epoch_plan(1000, 5, 0, world=w, batch=16 // w, accum=1, lengths=lengths) for w in (1, 2)}
    for plan in grouped.values():
        rows = [j for step in plan for rank in step for micro in rank for j in micro]
        assert sorted(rows) == list(range(1000))
        assert len(plan) == len(plain)
    # the rows of each step do not depend on how many workers share it (world x batch is the same)
    assert [sorted(j for r in s for m in r for j in m) for s in grouped[1]] == \
        [sorted(j for r in s for m in r for j in m) for s in grouped[2]]

    def padded(plan):  # tokens fed when each micro-batch pads to its longest row
        return sum(len(m) * max(lengths[j] for j in m) for s in plan for r in s for m in r if m)

    assert padded(grouped[1]) < 0.6 * padded(plain), (padded(grouped[1]), padded(plain))
    assert epoch_plan(1000, 5, 1, 1, 16, 1, lengths) != grouped[1]  # another order each epoch


def test_a_model_whose_attention_ignores_position_ids_is_refused_for_packing(tiny_llama_dir):
    """packing_problem: Llama keeps packed examples apart (SDPA and eager); OPT builds its causal mask without the
    position ids, so a packed example would see the one before it: refused, with the model type named."""
    from transformers import OPTConfig, OPTForCausalLM

    for impl in ("sdpa", "eager"):
        assert packing_problem(model(tiny_llama_dir, impl)) is None
    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32))
    problem = packing_problem(opt)
    assert problem is not None and problem.startswith("model type 'opt' does not keep packed examples apart")
    assert opt.training, "the probe leaves the model in the mode it found it in"


def test_evaluation_batches_of_a_causal_lm_hold_a_bounded_number_of_tokens():
    """Longest first: at most `rows` rows a batch, and where a token bound is given, at most that many padded
    tokens (the first row of a batch is its widest); every row once, in order."""
    lengths = [300, 290, 120, 100, 60, 50, 40, 30, 20, 10, 10, 5]
    order = list(range(len(lengths)))
    batches = _batches(order, lengths, rows=4, tokens=400)
    assert [j for b in batches for j in b] == order
    assert all(len(b) * lengths[b[0]] <= 400 or len(b) == 1 for b in batches)
    assert [len(b) for b in batches] == [1, 1, 3, 4, 3]
    assert [len(b) for b in _batches(order, lengths, rows=4, tokens=None)] == [4, 4, 4]


def test_packs_built_a_chunk_at_a_time_on_disk_are_the_packs_built_at_once(examples, tmp_path, monkeypatch):
    """pack writes each chunk of packs to the scratch folder and maps it back: the same rows as in memory."""
    whole = D.pack(examples, MAX_LEN, seed=1)[0].to_dict()
    monkeypatch.setattr(D, "PACK_CHUNK_TOKENS", 700)  # several chunks
    chunked, sizes = D.pack(examples, MAX_LEN, seed=1, scratch=tmp_path)
    assert len(list(tmp_path.glob("packed-*.arrow"))) > 2
    assert chunked.to_dict() == whole and sum(sizes) == len(examples)
    with pytest.raises(ValueError, match="no examples to pack"):
        D.pack(examples.select([]), MAX_LEN, seed=1)
