"""`fat-distill config show`: the config as YAML, with what every unset regime field resolves to.

``lr``, ``epochs`` and ``warmup_epochs`` of a training section left unset (null) take the
regime's default (:mod:`fat_distill.train.regimes`): from scratch without ``weights``,
pretrained with them. The YAML keeps ``null`` (so the output stays a config that follows the
regime when ``weights`` changes) and a comment gives the value the run will use and why.
"""

from __future__ import annotations

import re

import yaml
from pydantic import BaseModel

from fat_distill.train import TrainConfig
from fat_distill.train.regimes import REGIME_FIELDS

_NULL_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*): null$")
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):")


def _role(path: list[str]) -> str:
    return "teacher" if path and path[0] == "teacher" else "student"


def show_yaml(config: BaseModel) -> str:
    """``config`` as YAML; unset regime fields of every :class:`TrainConfig` carry a comment with their value.

    E.g. ``  lr: null  # 0.003: scratch regime (weights: null) default``.
    """
    lines = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).splitlines()
    path: list[tuple[int, str]] = []
    out = []
    for line in lines:
        match = _KEY.match(line)
        if match:
            indent = len(match["indent"])
            while path and path[-1][0] >= indent:
                path.pop()
            keys = [k for _, k in path]
            null = _NULL_KEY.match(line)
            if null and null["key"] in (*REGIME_FIELDS, "pad"):
                section = _lookup(config, keys)
                if isinstance(section, TrainConfig):
                    value = getattr(section.resolved(_role(keys)), null["key"])
                    why = ("10 px per 128 px of image height" if null["key"] == "pad" else
                           "scratch regime (weights: null)" if section.regime == "scratch"
                           else "pretrained regime (weights set)")
                    per = " a round" if null["key"] == "epochs" and _role(keys) == "teacher" else ""
                    line = f"{line}  # {value:g}{per}: {why}" + ("" if null["key"] == "pad" else " default")
            path.append((indent, match["key"]))
        out.append(line)
    return "\n".join(out) + "\n"


def _lookup(config: BaseModel, keys: list[str]) -> object:
    node: object = config
    for key in keys:
        node = getattr(node, key, None)
        if node is None:
            return None
    return node
