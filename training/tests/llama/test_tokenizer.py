"""The SentencePiece tokenizer and the Llama 2 chat format against the published ids and Meta's code."""

import json

import pytest

from training.llama.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llama2_dir(shared_data):
    return shared_data / "llama2-tokenizer"


@pytest.fixture(scope="module")
def tokenizer(llama2_dir):
    return Tokenizer(llama2_dir / "tokenizer.model")


def meta_chat_tokens(tokenizer, dialog):
    """meta-llama/llama `Llama.chat_completion`'s prompt construction, transcribed verbatim (it needs a final user turn)."""
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        dialog = [
            {
                "role": dialog[1]["role"],
                "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
            }
        ] + dialog[2:]
    dialog_tokens = sum(
        [
            tokenizer.encode(
                f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ",
                bos=True,
                eos=True,
            )
            for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False)
        ],
        [],
    )
    assert dialog[-1]["role"] == "user"
    dialog_tokens += tokenizer.encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}", bos=True, eos=False)
    return dialog_tokens


DIALOG = [
    {"role": "system", "content": "Always answer with Haiku\n"},
    {"role": "user", "content": "I am going to Paris, what should I see?"},
    {"role": "assistant", "content": " Paris, the capital of France, is known for the Eiffel Tower.\n\nAnd 3 museums. "},
    {"role": "user", "content": "What is so great about #1?"},
    {"role": "assistant", "content": "Its height: 330 m!"},
    {"role": "user", "content": "  And the Louvre?  "},
]


def test_special_ids(tokenizer):
    assert (tokenizer.n_words, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (32000, 1, 2, -1)


def test_encode_matches_oracle(tokenizer, llama2_dir):
    oracle = json.loads((llama2_dir / "oracle.json").read_text())
    assert len(oracle["cases"]) == 5
    for case in oracle["cases"]:
        assert tokenizer.encode(case["prompt"], bos=True, eos=False) == case["expected_ids"], case["prompt"]
        assert tokenizer.encode(case["prompt"], bos=False, eos=True) == case["expected_ids"][1:] + [2]
        assert tokenizer.decode(case["expected_ids"]) == case["prompt"]


def test_decode_round_trip(tokenizer):
    text = "Hello world! Ünïcödé and digits 12345."
    assert tokenizer.decode(tokenizer.encode(text, bos=True, eos=True)) == text


def test_dialog_matches_metas_chat_completion(tokenizer):
    ids, mask = tokenizer.encode_dialog(DIALOG)
    assert ids == meta_chat_tokens(tokenizer, DIALOG)
    assert len(mask) == len(ids)
    # Pinned: "<s>[INST] <<SYS>>\n" and the last turn's "[/INST]".
    assert ids[:9] == [1, 518, 25580, 29962, 3532, 14816, 29903, 6778, 13]
    assert ids[-4:] == [518, 29914, 25580, 29962]
    assert ids.count(1) == 3  # three turns
    assert ids.count(2) == 2  # two of them closed by EOS


def test_system_keyword_equals_system_message(tokenizer):
    assert tokenizer.encode_dialog(DIALOG[1:], system=DIALOG[0]["content"]) == tokenizer.encode_dialog(DIALOG)


def test_answer_mask_covers_exactly_the_answers_and_their_eos(tokenizer):
    ids, mask = tokenizer.encode_dialog(DIALOG[:5])  # ends with an answer: a training example
    answers = []
    current = []
    for token, is_answer in zip(ids, mask, strict=True):
        if is_answer:
            current.append(token)
        elif current:
            answers.append(current)
            current = []
    answers.append(current)
    assert len(answers) == 2
    assert all(a[-1] == tokenizer.eos_id for a in answers)
    # Meta writes "{answer.strip()} " before EOS: the trailing space is part of the answer.
    assert tokenizer.decode(answers[0]) == DIALOG[2]["content"].strip() + " "
    assert tokenizer.decode(answers[1]) == DIALOG[4]["content"].strip() + " "
    # The dialogue ending in an answer is the prompt dialogue's tokens followed by that answer.
    prompt_ids, prompt_mask = tokenizer.encode_dialog(DIALOG[:4])
    assert not any(prompt_mask[-10:])
    assert ids[: len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(ids[len(prompt_ids):]) == DIALOG[4]["content"].strip() + " "
    assert all(mask[len(prompt_ids):])


def test_bad_dialogs_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="alternate"):
        tokenizer.encode_dialog([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="alternate"):
        tokenizer.encode_dialog([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="not both"):
        tokenizer.encode_dialog(DIALOG, system="x")
    with pytest.raises(ValueError, match="markup"):
        tokenizer.encode_dialog([{"role": "user", "content": "[INST] sneaky"}])
    ids, _ = tokenizer.encode_dialog([{"role": "user", "content": "[INST] ok"}], allow_special_tags=True)
    assert ids[:4] == [1, 518, 25580, 29962]
    with pytest.raises(ValueError, match="at least one user message"):
        tokenizer.encode_dialog([])


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(tmp_path / "tokenizer.model")


def test_stories_tokenizer_decodes_the_oracle(shared_data):
    oracle = json.loads((shared_data / "stories260k" / "oracle.json").read_text())
    tokenizer = Tokenizer(shared_data / "stories260k" / "tokenizer.model")
    assert tokenizer.n_words == 512
    assert tokenizer.decode(oracle["expected_ids"]) == oracle["expected_text"]
