"""The word tokenizer of catalog models (dooly/catalog/tokenizer.py): token counts are exact both ways.

Random ids -> decode -> encode gives the same ids, through `tokenizers` and through transformers'
AutoTokenizer (what vLLM and `vllm bench serve` load); a prompt of k words is k tokens (+1 BOS where the
family's real tokenizer adds one); the chat template joins the messages' words; vLLM's random dataset
recipe (decode random non-special ids, re-encode without special tokens) keeps every count.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dooly.catalog import resolve
from dooly.catalog.tokenizer import adds_bos, special_tokens, write_tokenizer


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    config = resolve("dooly/tiny-llama").config
    folder = tmp_path_factory.mktemp("tiny-llama")
    (folder / "config.json").write_text(json.dumps(config))  # beside the model's config, as vLLM sees it
    return config, write_tokenizer(config, folder)


def _loaders(folder):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")), AutoTokenizer.from_pretrained(str(folder))


def test_random_ids_round_trip(llama_folder):
    config, folder = llama_folder
    raw, auto = _loaders(folder)
    assert auto.vocab_size == raw.get_vocab_size() == len(auto) == config["vocab_size"]
    rng = np.random.default_rng(0)
    for n in (1, 7, 500, 3000):
        ids = rng.integers(0, config["vocab_size"], size=n).tolist()  # special ids included
        text = raw.decode(ids, skip_special_tokens=False)
        assert text == auto.decode(ids, skip_special_tokens=False)
        assert raw.encode(text, add_special_tokens=False).ids == ids
        assert auto.encode(text, add_special_tokens=False) == ids
        with_bos = auto.encode(text)  # the tiny Llama adds BOS, like Llama's real tokenizer
        assert with_bos == [config["bos_token_id"], *ids] and len(raw.encode(text).ids) == n + 1


def test_words_are_tokens(llama_folder):
    config, folder = llama_folder
    raw, auto = _loaders(folder)
    assert adds_bos(config) and auto.num_special_tokens_to_add() == 1
    assert auto.decode([5, 17, 300]) == "w5 w17 w300"
    assert auto("w5 w17  w300\n w9").input_ids == [1, 5, 17, 300, 9]
    k = 200
    prompt = " ".join(f"w{i}" for i in range(1, k + 1))  # w1 and w2 are BOS/EOS ids here: one <unk> each
    assert len(auto(prompt).input_ids) == len(raw.encode(prompt).ids) == k + 1
    assert auto("hello, world!").input_ids == [1, auto.unk_token_id, auto.unk_token_id]
    assert (auto.bos_token, auto.eos_token, auto.unk_token) == ("<s>", "</s>", "<unk>")
    assert (auto.bos_token_id, auto.eos_token_id, auto.unk_token_id) == (1, 2, 0)
    assert auto.model_max_length == config["max_position_embeddings"]
    chat = [{"role": "system", "content": "w10 w11"}, {"role": "user", "content": "w12"}]
    text = auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<s> w10 w11 w12"
    assert auto.encode(text, add_special_tokens=False) == [1, 10, 11, 12]


def test_vllm_random_dataset_recipe_keeps_counts(llama_folder):
    """`vllm bench serve --dataset-name random`: input_len - num_special_tokens_to_add() ids drawn from the
    non-special ones, decoded, re-encoded without special tokens; the server then adds BOS."""
    config, folder = llama_folder
    _, auto = _loaders(folder)
    allowed = np.array(sorted(set(range(auto.vocab_size)) - set(auto.all_special_ids)))
    input_len = 64
    for index, offset in enumerate((0, 17, 7999)):
        seq = allowed[(offset + index + np.arange(input_len - auto.num_special_tokens_to_add())) % len(allowed)].tolist()
        prompt = auto.decode(seq)
        assert auto.encode(prompt, add_special_tokens=False) == seq
        assert len(auto.encode(prompt)) == input_len  # what the server counts as prompt tokens


def test_families_and_special_ids(tmp_path):
    from transformers import AutoTokenizer

    qwen = resolve("dooly/tiny-qwen2").config  # Qwen's real tokenizer adds no BOS
    write_tokenizer(qwen, tmp_path / "qwen")  # alone: beside a qwen2 config.json transformers swaps the class
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "qwen"))
    assert not adds_bos(qwen) and auto.num_special_tokens_to_add() == 0 and auto("w5 w6").input_ids == [5, 6]
    llama3 = resolve("meta-llama/Llama-3.1-8B-Instruct").config  # eos_token_id is a list of three
    roles = special_tokens(llama3)
    assert roles["bos"] == ("<s>", 128000) and roles["eos"] == ("</s>", 128001) and roles["unk"] == ("<unk>", 0)
    write_tokenizer(llama3, tmp_path / "llama3")
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "llama3"))
    assert {128000, 128001, 128008, 128009, 0} == set(auto.all_special_ids)
    ids = [128008, 5, 128255, 0]
    assert auto.encode(auto.decode(ids), add_special_tokens=False) == ids
    same = dict(qwen, bos_token_id=7, eos_token_id=7)  # one id, two roles: it keeps the first role's name
    assert special_tokens(same)["eos"] == ("<s>", 7)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        special_tokens(dict(qwen, eos_token_id=qwen["vocab_size"]))
