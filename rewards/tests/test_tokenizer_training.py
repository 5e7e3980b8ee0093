from rewards.data import PreferencePair, render_reply
from rewards.tokenizer_training import CHAT_PIECES, RARE_PIECE, pair_texts, train_pair_tokenizer
from training.llama.tokenizer import Tokenizer


def _pairs() -> list[PreferencePair]:
    words = "please help me with the garden plants water sunlight soil seeds grow tall".split()
    pairs = []
    for i in range(60):
        prompt = " ".join(words[(i + k) % len(words)] for k in range(6))
        pairs.append(PreferencePair(
            dialogue=[{"role": "user", "content": f"Can you {prompt}?"}],
            chosen=f"Sure, the {words[i % len(words)]} needs care number {i}.",
            rejected=f"No. I refuse to talk about {words[(i * 7) % len(words)]}!",
        ))
    return pairs


def test_texts_are_every_message_once():
    pairs = _pairs()
    texts = list(pair_texts(pairs + pairs))
    assert len(texts) == len(set(texts))
    assert pairs[0].chosen in texts
    assert pairs[0].rejected in texts
    assert pairs[0].dialogue[0]["content"] in texts


def test_trained_tokenizer_is_deterministic_and_speaks_the_chat_format(tmp_path):
    a = train_pair_tokenizer(_pairs(), tmp_path / "a" / "tokenizer.model", vocab_size=120)
    b = train_pair_tokenizer(_pairs(), tmp_path / "b" / "tokenizer.model", vocab_size=120)
    assert a.read_bytes() == b.read_bytes()
    tok = Tokenizer(a)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)
    assert tok.sp_model.id_to_piece(3) == RARE_PIECE  # the shared embedding of rare pieces (eos_id + 1)
    assert tok.n_words <= 120
    pair = _pairs()[5]
    ids = render_reply(tok, pair.dialogue, pair.chosen, 64)
    assert ids[0] == tok.bos_id
    assert ids[-1] == tok.eos_id
    assert 3 not in ids
    for piece in CHAT_PIECES:
        assert tok.sp_model.piece_to_id(piece) in ids
    assert "garden" in tok.decode(ids)


def test_bpe_and_word_models_and_case_folding(tmp_path):
    for model_type in ("bpe", "word"):
        tok = Tokenizer(train_pair_tokenizer(_pairs(), tmp_path / f"{model_type}.model", vocab_size=100,
                                             model_type=model_type, lowercase=True))
        assert tok.encode("SURE the Garden", bos=False, eos=False) == tok.encode("sure the garden", bos=False, eos=False)
