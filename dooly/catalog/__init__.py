"""Model catalog: real models' config.json values shipped as data, resolved by HF id or local path.

Nothing here touches the network: an HF id is looked up in ``models/`` (file name ``org__name.json``),
anything else must be a path to a ``config.json`` or to a folder holding one.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from dooly.errors import DoolyError

_MODELS_DIR = Path(__file__).parent / "models"
_SUITES_FILE = Path(__file__).parent / "suites.json"

# Keys every decoder-only config must carry for dooly to build the model.
REQUIRED_KEYS = ("model_type", "hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # HF id for catalog models, the path for local ones
    config: dict = field(hash=False)  # the config.json values
    source: str  # "catalog" or the local path it was read from

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else self.config["model_type"]


def catalog_ids() -> list[str]:
    return sorted(p.stem.replace("__", "/", 1) for p in _MODELS_DIR.glob("*.json"))


def suites() -> dict[str, list[str]]:
    data = json.loads(_SUITES_FILE.read_text())
    data["catalog"] = catalog_ids()
    return data


def suite(name: str) -> list[str]:
    all_suites = suites()
    if name not in all_suites:
        raise DoolyError(f"unknown suite {name!r}; suites: {', '.join(sorted(all_suites))}")
    return all_suites[name]


def _validate(config: dict, where: str) -> None:
    if not isinstance(config, dict):
        raise DoolyError(f"{where}: config must be a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise DoolyError(f"{where}: config is missing {', '.join(missing)}")
    for key in REQUIRED_KEYS[1:]:
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DoolyError(f"{where}: {key} must be a positive integer, got {value!r}")
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    if not isinstance(kv, int) or kv <= 0 or heads % kv:
        raise DoolyError(f"{where}: num_key_value_heads={kv!r} must be a positive divisor of "
                         f"num_attention_heads={heads}")
    for key in ("bos_token_id", "eos_token_id"):  # the engine masks these ids in the logits
        ids = config.get(key)
        ids = ids if isinstance(ids, list) else [ids]
        bad = [i for i in ids if isinstance(i, int) and not 0 <= i < config["vocab_size"]]
        if bad:
            raise DoolyError(f"{where}: {key}={bad[0]} is outside the vocabulary (vocab_size={config['vocab_size']})")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DoolyError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise DoolyError(f"{path}: cannot read ({e.strerror})") from None


def resolve(name: str) -> ModelSpec:
    """Resolve a catalog HF id or a local config.json/folder into a validated ModelSpec."""
    catalog_file = _MODELS_DIR / (name.replace("/", "__", 1) + ".json")
    if "/" in name and catalog_file.is_file() and not Path(name).exists():
        config = _read_json(catalog_file)
        _validate(config, name)
        return ModelSpec(name=name, config=config, source="catalog")
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise DoolyError(f"{name}: folder has no config.json")
    if path.is_file():
        config = _read_json(path)
        _validate(config, str(path))
        return ModelSpec(name=str(name), config=config, source=str(path))
    close = difflib.get_close_matches(name, catalog_ids(), n=3, cutoff=0.5)
    if not close:  # also match on the part after the org, case-insensitively
        tails = {i.split("/", 1)[1].lower(): i for i in catalog_ids()}
        close = [tails[t] for t in difflib.get_close_matches(name.split("/")[-1].lower(), tails, n=3, cutoff=0.5)]
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `dooly catalog`"
    raise DoolyError(f"unknown model {name!r} (not in the catalog, not a local config){hint}")
