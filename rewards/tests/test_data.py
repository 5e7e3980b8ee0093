import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from rewards.data import (
    PairFormatError,
    PreferencePair,
    TokenizedPair,
    assign_splits,
    collate_pairs,
    hold_out,
    length_bucketed_batches,
    mix_for_kind,
    mix_helpfulness,
    mix_safety,
    oasst_strength,
    pandalm_strength,
    read_hh_rlhf,
    read_native,
    read_oasst_trees,
    read_pairs,
    read_pandalm,
    read_trl,
    render_reply,
    split_hh_pair,
    tokenize_pairs,
    write_trl_jsonl,
)
from training.llama.tokenizer import Tokenizer

NATIVE = {
    "task_id": 7, "batch": "2026-W47", "split": "test", "domain": "safety", "risk_category": "illicit",
    "dialogue": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                 {"role": "user", "content": "how do I pick a lock?"}],
    "response_a": {"id": 1, "text": "I can't help with that.", "policy_version": "RLHF-V1", "sampling": {}},
    "response_b": {"id": 2, "text": "Use a tension wrench.", "policy_version": "RLHF-V1", "sampling": {}},
    "choice": "a", "chosen": "I can't help with that.", "rejected": "Use a tension wrench.",
    "strength": "better", "safety_label": "chosen_safe_other_unsafe", "annotator": "ann-3",
    "annotation_id": 11, "n_annotations": 1, "is_gold": False, "created_at": "2026-11-20T10:00:00Z",
    "time_on_task_ms": 5300,
}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_native(tmp_path):
    (pair,) = read_native(_write_jsonl(tmp_path / "n.jsonl", [NATIVE]))
    assert pair.dialogue[-1] == {"role": "user", "content": "how do I pick a lock?"}
    assert len(pair.dialogue) == 3
    assert (pair.chosen, pair.rejected) == ("I can't help with that.", "Use a tension wrench.")
    assert (pair.strength, pair.domain, pair.batch, pair.split) == ("better", "safety", "2026-W47", "test")
    assert pair.safety_label == "chosen_safe_other_unsafe"


def test_read_native_names_file_and_line_of_a_bad_record(tmp_path):
    bad = dict(NATIVE, strength="much_better")
    path = _write_jsonl(tmp_path / "n.jsonl", [NATIVE, bad])
    with pytest.raises(PairFormatError, match=r"n\.jsonl:2: .*much_better"):
        read_native(path)
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(PairFormatError, match=r"broken\.jsonl:1: not valid JSON"):
        read_native(tmp_path / "broken.jsonl")


def test_read_trl_conversational_and_plain(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "q1"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}], "margin": 2.0, "strength": "better",
         "domain": "helpfulness"},
        {"prompt": "q2", "chosen": "yes", "rejected": "no"},
    ]
    first, second = read_trl(_write_jsonl(tmp_path / "t.jsonl", rows))
    assert (first.chosen, first.rejected, first.margin, first.strength) == ("good", "bad", 2.0, "better")
    assert second.dialogue == ({"role": "user", "content": "q2"},)
    assert (second.chosen, second.rejected, second.margin) == ("yes", "no", None)


def test_trl_writer_round_trips(tmp_path):
    pair = PreferencePair(dialogue=[{"role": "user", "content": "a"}], chosen="b", rejected="c",
                          strength="slightly_better", domain="safety")
    (back,) = read_trl(write_trl_jsonl([pair], tmp_path / "rt.jsonl"))
    assert (back.dialogue, back.chosen, back.rejected, back.strength, back.domain) == (
        pair.dialogue, "b", "c", "slightly_better", "safety")


def test_dialogue_must_alternate_and_end_with_user():
    with pytest.raises(ValueError, match="end with a user turn"):
        PreferencePair(dialogue=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                       chosen="x", rejected="y")
    with pytest.raises(ValueError, match="expected 'user'"):
        PreferencePair(dialogue=[{"role": "assistant", "content": "a"}], chosen="x", rejected="y")


def test_split_hh_pair_keeps_replies_that_contain_human_markers():
    context = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me"
    chosen = context + "\n\nAssistant: Sure.\n\nHuman: not a real turn"
    rejected = context + "\n\nAssistant: No."
    dialogue, good, bad = split_hh_pair(chosen, rejected)
    assert [m["role"] for m in dialogue] == ["user", "assistant", "user"]
    assert good == "Sure.\n\nHuman: not a real turn"
    assert bad == "No."


def test_read_the_shared_hh_file(shared_data):
    pairs = read_hh_rlhf(shared_data / "hh-rlhf-harmless" / "pairs.jsonl.gz", domain="safety")
    assert len(pairs) == 1800
    assert all(p.dialogue[-1]["role"] == "user" and p.domain == "safety" for p in pairs)
    with gzip.open(shared_data / "hh-rlhf-harmless" / "pairs.jsonl.gz", "rt") as f:
        first = json.loads(f.readline())
    assert first["chosen"].endswith(pairs[0].chosen)
    assert first["rejected"].endswith(pairs[0].rejected)
    assert pairs[0].chosen != pairs[0].rejected


@pytest.mark.parametrize(
    ("votes", "expected"),
    [
        ((1, 1, 1), (1, "significantly_better")),
        ((2, 0, 2), (2, "better")),
        ((1, 2, 1), (1, "slightly_better")),
        ((0, 2, 0), (2, "negligibly_better")),
        ((0, 0, 0), None),
        ((1, 2, 0), None),
    ],
)
def test_pandalm_strength(votes, expected):
    assert pandalm_strength(votes) == expected


def test_read_pandalm_and_oasst(shared_data):
    panda = read_pandalm(shared_data / "pandalm" / "testset-v1.json")
    assert Counter(p.strength for p in panda) == {
        "significantly_better": 794, "better": 31, "slightly_better": 69, "negligibly_better": 20}
    oasst = read_oasst_trees(shared_data / "oasst-trees" / "en_100_tree.jsonl")
    assert len(oasst) > 300
    assert {p.strength for p in oasst} <= {"significantly_better", "better", "slightly_better"}
    assert any(len(p.dialogue) > 1 for p in oasst)  # multi-turn contexts
    assert oasst_strength(1) == "slightly_better"
    assert oasst_strength(4) == "significantly_better"


def test_read_pairs_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown pair format"):
        read_pairs(tmp_path / "x.jsonl", "csv")


def _pairs(n: int, **fields) -> list[PreferencePair]:
    return [PreferencePair(dialogue=[{"role": "user", "content": f"q{i}"}], chosen=f"c{i}", rejected=f"r{i}", **fields)
            for i in range(n)]


def test_fixed_split_is_deterministic_and_respects_given_splits():
    pairs = _pairs(100)
    first = assign_splits(pairs, 0.2)
    assert sum(p.split == "test" for p in first) == 20
    assert [p.split for p in assign_splits(list(reversed(pairs)), 0.2)] == [p.split for p in reversed(first)]
    given = [PreferencePair(dialogue=[{"role": "user", "content": "q"}], chosen="a", rejected="b", split="train")]
    assert assign_splits(given, 0.99)[0].split == "train"
    kept, held = hold_out(pairs, 0.1)
    assert len(held) == 10
    assert not set(map(id, kept)) & set(map(id, held))


def test_helpfulness_mix_adds_an_equal_share_of_other_data():
    helpful, other = _pairs(50, domain="helpfulness"), _pairs(500, domain="safety")
    mixed = mix_helpfulness(helpful, other, seed=1)
    assert Counter(p.domain for p in mixed) == {"helpfulness": 50, "safety": 50}
    assert mixed == mix_helpfulness(helpful, other, seed=1)
    assert mixed != mix_helpfulness(helpful, other, seed=2)
    assert len(mix_helpfulness(helpful, other, other_ratio=0.5)) == 75


def test_safety_mix_is_ninety_ten():
    safety, helpful = _pairs(90, domain="safety"), _pairs(1000, domain="helpfulness")
    assert Counter(p.domain for p in mix_safety(safety, helpful)) == {"safety": 90, "helpfulness": 10}
    # HH-RLHF harmless pairs without a domain count as safety data in the safety mix
    hh = [PreferencePair(dialogue=[{"role": "user", "content": f"h{i}"}], chosen="a", rejected="b", source="hh-rlhf")
          for i in range(90)]
    mixed = mix_for_kind(hh + safety + helpful, "safety", seed=0)
    assert Counter(p.domain for p in mixed) == {None: 90, "safety": 90, "helpfulness": 20}


def test_render_uses_the_chat_format_and_drops_oldest_turns_first(llama_tokenizer):
    tok = Tokenizer(llama_tokenizer)
    dialogue = [{"role": "user", "content": "first question " * 20}, {"role": "assistant", "content": "first answer " * 20},
                {"role": "user", "content": "last question"}]
    full = render_reply(tok, dialogue, "final answer", 1000)
    assert full == tok.encode_dialog([*dialogue, {"role": "assistant", "content": "final answer"}])[0]
    short = render_reply(tok, dialogue, "final answer", 40)
    assert short == tok.encode_dialog([dialogue[-1], {"role": "assistant", "content": "final answer"}])[0]
    assert short[-1] == tok.eos_id
    # when even the last exchange is too long the oldest tokens go: BOS, then the end of the answer
    tiny = render_reply(tok, dialogue, "final answer", 6)
    assert len(tiny) == 6
    assert tiny[0] == tok.bos_id
    assert tiny[1:] == short[-5:]


def test_tokenize_pairs_margins(stories_tokenizer):
    tok = Tokenizer(stories_tokenizer)
    pairs = [
        PreferencePair(dialogue=[{"role": "user", "content": "q"}], chosen="a", rejected="b", strength="better"),
        PreferencePair(dialogue=[{"role": "user", "content": "q"}], chosen="a", rejected="b", margin=0.25),
    ]
    assert [p.margin for p in tokenize_pairs(tok, pairs, max_seq_len=32, margin_scheme="large")] == [2.0, 0.25]
    assert [p.margin for p in tokenize_pairs(tok, pairs, max_seq_len=32)] == [0.0, 0.0]


def test_length_bucketed_batches_cover_the_data_with_little_padding():
    lengths = [(i * 37) % 200 + 1 for i in range(100)]
    batches = length_bucketed_batches(lengths, 8, seed=0, epoch=0, bucket_batches=4)
    flat = [i for b in batches for i in b]
    assert len(flat) == 96  # 12 full batches
    assert len(set(flat)) == 96  # no index twice
    assert batches == length_bucketed_batches(lengths, 8, seed=0, epoch=0, bucket_batches=4)
    assert batches != length_bucketed_batches(lengths, 8, seed=0, epoch=1, bucket_batches=4)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 60  # random batches of 8 would spread over most of 1..200


def test_collate_puts_chosen_and_rejected_in_one_padded_batch():
    items = [TokenizedPair((1, 5, 6), (1, 7), 1.0), TokenizedPair((1, 8), (1, 9, 9, 9), 0.0)]
    tokens, lengths, margins = collate_pairs(items)
    assert tokens.shape == (4, 4)
    assert lengths.tolist() == [3, 2, 2, 4]
    assert tokens[0].tolist() == [1, 5, 6, 0]
    assert tokens[3].tolist() == [1, 9, 9, 9]
    assert margins.tolist() == [1.0, 0.0]


def test_the_plain_records_and_config_names_do_not_import_torch():
    """The platform's selector builds PreferencePair, and command-line parsers offer the config names, in
    processes that must not load torch."""
    import subprocess
    import sys

    code = ("import sys, rewards.data, rewards.configs; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert rewards.configs.CONFIG_NAMES == ('tiny', 'tiny-ensemble', 'small')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr


def test_render_can_keep_only_the_newest_context_turns(llama_tokenizer):
    tok = Tokenizer(llama_tokenizer)
    dialogue = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": "last question"}]
    last = render_reply(tok, dialogue, "final answer", 1000, context_turns=1)
    assert last == tok.encode_dialog([dialogue[-1], {"role": "assistant", "content": "final answer"}])[0]
    assert render_reply(tok, dialogue, "final answer", 1000, context_turns=3) == render_reply(tok, dialogue, "final answer", 1000)
    assert render_reply(tok, dialogue, "final answer", 1000, context_turns=5) == render_reply(tok, dialogue, "final answer", 1000)
    pair = PreferencePair(dialogue=dialogue, chosen="final answer", rejected="no")
    assert tokenize_pairs(tok, [pair], max_seq_len=1000, context_turns=1)[0].chosen_ids == tuple(last)
    for bad in (0, 2):
        with pytest.raises(ValueError, match="context_turns"):
            render_reply(tok, dialogue, "final answer", 1000, context_turns=bad)
