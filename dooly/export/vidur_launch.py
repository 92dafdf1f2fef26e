"""Run Vidur on a dooly export (copied into the export folder; runs in Vidur's environment, not dooly's).

Vidur finds models, devices and nodes by name among the subclasses of its config classes
(BaseModelConfig.create_from_name, BaseDeviceSKUConfig / BaseNodeSKUConfig.create_from_type_string).
This registers the exported model and device from manifest.json where this Vidur lacks them, checks a
model Vidur already knows against the export, then runs Vidur's own entry point with the arguments
given:  python vidur_launch.py --replica_config_model_name ... (see README.md)
"""

import json
import sys
from dataclasses import field, make_dataclass
from pathlib import Path


REGISTERED = []  # Vidur finds them through __subclasses__(), which holds weak references only


def _known(cls, lookup, name):
    try:
        return getattr(cls, lookup)(name)
    except ValueError:
        return None


def _fixed(cls_name, base, values, identity):
    fields = [(k, type(v), field(default=v)) for k, v in values.items()]
    REGISTERED.append(make_dataclass(cls_name, fields, bases=(base,), namespace=identity))


def register(spec):
    from vidur.config.device_sku_config import BaseDeviceSKUConfig
    from vidur.config.model_config import BaseModelConfig
    from vidur.config.node_sku_config import BaseNodeSKUConfig
    from vidur.types import ActivationType, NormType

    name, model = spec["model_name"], dict(spec["model_config"])
    model["activation"] = ActivationType.from_str(model["activation"])
    model["norm"] = NormType.from_str(model["norm"])
    known = _known(BaseModelConfig, "create_from_name", name)
    if known is None:
        _fixed("DoolyModelConfig", BaseModelConfig, model, {"get_name": staticmethod(lambda: name)})
    else:
        differ = {k: (getattr(known, k), v) for k, v in model.items()
                  if k not in ("max_model_len", "rope_theta", "partial_rotary_factor") and getattr(known, k) != v}
        if differ:
            sys.exit(f"Vidur already defines {name} differently (vidur, export): {differ}")
    device = spec["device"]
    if _known(BaseDeviceSKUConfig, "create_from_type_string", device) is None:
        values = {k: float("nan") if v is None else v for k, v in spec["device_config"].items()}
        _fixed("DoolyDeviceSKUConfig", BaseDeviceSKUConfig, values, {"get_type": staticmethod(lambda: device)})
    node = spec["network_device"]
    if _known(BaseNodeSKUConfig, "create_from_type_string", node) is None:
        _fixed("DoolyNodeSKUConfig", BaseNodeSKUConfig,
               {"device_sku_type": device, "num_devices_per_node": spec["num_devices_per_node"]},
               {"get_type": staticmethod(lambda: node)})


if __name__ == "__main__":
    register(json.loads((Path(__file__).parent / "manifest.json").read_text())["vidur"])
    from vidur.main import main

    main()
