"""A local, exact tokenizer for catalog models: one whitespace-separated word is one token.

Catalog models are configs without weights or tokenizer files, yet serving them (the real ``vllm serve
--load-format dummy``, ``dooly serve``, ``vllm bench serve``) needs a tokenizer, and a latency comparison
needs token counts both sides agree on exactly. ``write_tokenizer(config, folder)`` writes one that
needs no download:

* ``tokenizer.json`` (the ``tokenizers`` library): a WordLevel model over ``vocab_size`` ids where id
  ``i`` is the word ``w{i}``, except the special ids, which carry their own names: the config's
  ``bos_token_id`` (``<s>``), ``eos_token_id`` (``</s>``; further ids of a list ``<eos_{id}>``),
  ``pad_token_id`` (``<pad>``) and an unknown token ``<unk>`` (id 0, or the lowest id no other special
  token holds). One id may hold several roles (Qwen's BOS is its EOS): it keeps the first role's name.
  A WhitespaceSplit pre-tokenizer, so any text is exactly as many tokens as it has whitespace-separated
  words (a word outside the vocabulary, including ``w{i}`` of a special id, is one ``<unk>``); the
  special tokens are registered as added tokens, so ``<s>`` in a text is that one token. A WordPiece
  decoder (prefix ``##``, which no token has; no clean-up) joins tokens with single spaces: decoding
  ids gives ``"w5 w17 ..."``, incrementally too (``tokenizers.decoders.DecodeStream``, as vLLM does).
* ``tokenizer_config.json``: ``tokenizer_class: PreTrainedTokenizerFast``, the special tokens,
  ``model_max_length`` = ``max_position_embeddings``, and a chat template that joins the messages'
  contents with single spaces (after ``<s> `` when BOS is added), nothing else, so a chat request is
  as many tokens as the words of its messages (+1 with BOS) and ``add_generation_prompt`` adds none.
  Special tokens beyond the named roles (EOS ids of a list) are ``extra_special_tokens``, so
  ``all_special_ids`` holds every special id (``vllm bench serve`` never samples those).
* ``special_tokens_map.json`` for older loaders.

BOS: added at the start of every encoding (a TemplateProcessing post-processor ``<s> $A``) when the
config has a ``bos_token_id`` and the family's real tokenizer adds one (Llama, Mistral, Mixtral, Phi-3,
Yi, ...); not for the Qwen families, whose real tokenizers add none. Pass ``add_bos`` to decide
otherwise. Either way ``num_special_tokens_to_add()`` reports it, so ``vllm bench serve``'s random
dataset (which subtracts it from ``--random-input-len``, decodes random non-special ids and re-encodes
them without special tokens) sends prompts the server sees as exactly ``--random-input-len`` tokens,
and the decode -> encode round trip of any id sequence gives the same ids (special ids included, as
long as the decode keeps them).

The folder loads with ``tokenizers.Tokenizer.from_file(folder / "tokenizer.json")`` and with
``transformers.AutoTokenizer.from_pretrained(folder)`` (transformers 5.19: a ``TokenizersBackend``).
Pitfall: AutoTokenizer also reads a ``config.json`` in the same folder, and for a few model types it then
ignores ``tokenizer_class`` and uses the family's own class, which rebuilds its vocabulary from scratch
(``qwen2`` -> ``Qwen2Tokenizer``, a byte-level BPE: every prompt encodes to nothing). A tokenizer folder
without ``config.json`` (e.g. ``MODEL/tokenizer``, passed as ``--tokenizer``) loads right for every model
type; Llama, Mistral, Mixtral, Phi-3 and Qwen3 configs also load right beside it. Nothing here imports
transformers or vLLM (``tokenizers`` only, inside the functions).
"""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"

# Model types whose real tokenizers add no BOS token (their configs still name a bos_token_id).
_NO_BOS_FAMILIES = frozenset({"qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next", "gpt_neox", "gpt2",
                              "phi", "opt", "falcon", "starcoder2", "olmo", "olmo2"})

# A chat template for plain word prompts: the contents of the messages joined by single spaces (text
# parts of a list content too), after "<s> " where the tokenizer adds BOS (see chat_template()).
_CHAT_TEMPLATE = (
    "{%- if ADD_BOS %}{{ bos_token }} {% endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}"
    "{{ part['text'] }}{%- if not loop.last %} {% endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if not loop.last %} {% endif -%}"
    "{%- endfor -%}"
)


def _ids(value) -> list[int]:
    """A config's token id entry (None, an int, or a list of ints) as a list."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def special_tokens(config: dict) -> dict[str, tuple[str, int] | None]:
    """The special tokens of `config`'s tokenizer: role ("bos", "eos", "unk", "pad") -> (name, id), or
    None for a role the config has no id for (only bos/pad can be missing)."""
    vocab_size = int(config["vocab_size"])
    names: dict[int, str] = {}  # id -> the name its first role gives it

    def claim(token_id: int, name: str) -> tuple[str, int]:
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"special token id {token_id} is outside the vocabulary (vocab_size={vocab_size})")
        names.setdefault(token_id, name)
        return names[token_id], token_id

    roles: dict[str, tuple[str, int] | None] = {"bos": None, "eos": None, "unk": None, "pad": None}
    bos = _ids(config.get("bos_token_id"))
    if bos:
        roles["bos"] = claim(bos[0], BOS)
    eos = _ids(config.get("eos_token_id"))
    for i, token_id in enumerate(eos):
        got = claim(token_id, EOS if i == 0 else f"<eos_{token_id}>")
        if i == 0:
            roles["eos"] = got
    unk_id = next(i for i in range(vocab_size) if i not in names)  # 0 unless BOS/EOS hold it
    roles["unk"] = claim(unk_id, UNK)
    pad = _ids(config.get("pad_token_id"))
    if pad:
        roles["pad"] = claim(pad[0], PAD)
    if roles["eos"] is None:  # no eos_token_id: the highest free id, so the tokenizer still has one
        eos_id = next(i for i in range(vocab_size - 1, -1, -1) if i not in names)
        roles["eos"] = claim(eos_id, EOS)
    return roles


def _all_special(config: dict) -> dict[int, str]:
    """Every special id -> its name (the roles' ids and the further EOS ids of a list)."""
    roles = special_tokens(config)
    out = {tid: name for name, tid in (r for r in roles.values() if r)}
    for token_id in _ids(config.get("eos_token_id"))[1:]:
        out.setdefault(token_id, f"<eos_{token_id}>")
    return out


def added_names(config: dict) -> list[str]:
    """The names of all special tokens, by id."""
    return [name for _, name in sorted(_all_special(config).items())]


def adds_bos(config: dict) -> bool:
    """Whether the tokenizer written for `config` adds BOS: it has a bos_token_id and its family's real
    tokenizer adds one."""
    return bool(_ids(config.get("bos_token_id"))) and config.get("model_type") not in _NO_BOS_FAMILIES


def chat_template(add_bos: bool) -> str:
    """The jinja chat template: the messages' contents joined by single spaces, after the BOS token
    (and a space) when `add_bos`; nothing for add_generation_prompt."""
    return _CHAT_TEMPLATE.replace("ADD_BOS", "true" if add_bos else "false")


def build_tokenizer(config: dict, add_bos: bool | None = None):
    """The `tokenizers.Tokenizer` write_tokenizer saves (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab_size = int(config["vocab_size"])
    roles = special_tokens(config)
    special = _all_special(config)
    vocab = {f"w{i}": i for i in range(vocab_size) if i not in special}
    vocab.update({name: tid for tid, name in special.items()})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=roles["unk"][0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False)
                            for _, name in sorted(special.items())])
    if adds_bos(config) if add_bos is None else add_bos:
        if roles["bos"] is None:
            raise ValueError("add_bos=True but the config has no bos_token_id")
        bos_name, bos_id = roles["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_name}:0 $A:0", pair=f"{bos_name}:0 $A:0 {bos_name}:1 $B:1",
            special_tokens=[(bos_name, bos_id)])
    return tok


def write_tokenizer(config: dict, folder: Path, add_bos: bool | None = None) -> Path:
    """Write the word tokenizer of `config` (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json) into `folder` (created if missing); returns `folder`.

    add_bos: whether encodings start with BOS (default: `adds_bos(config)`, what the family's real
    tokenizer does)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bos_added = adds_bos(config) if add_bos is None else bool(add_bos)
    tok = build_tokenizer(config, add_bos=bos_added)
    tok.save(str(folder / "tokenizer.json"))
    roles = special_tokens(config)
    names = {f"{role}_token": r[0] for role, r in roles.items() if r}
    added = {str(tid): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
             for tid, name in sorted(_all_special(config).items())}
    extra = [name for name in added_names(config) if name not in names.values()]  # EOS ids of a list
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        **({"extra_special_tokens": extra} if extra else {}),
        "add_bos_token": bos_added,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "model_max_length": int(config.get("max_position_embeddings") or 1_000_000_000),
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template(bos_added),
        "model_input_names": ["input_ids", "attention_mask"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special_map = {**names, **({"additional_special_tokens": extra} if extra else {})}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return folder
