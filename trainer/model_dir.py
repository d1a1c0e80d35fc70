"""The model directory: what a trained model is saved as, and how it is loaded back.

Layout (written to a temporary sibling and renamed into place, :func:`save_trained`)::

    config.json          the full TrainConfig
    assets.json          catalog ids/texts/popularity and the vocabularies of the preprocessor
    encoders.json        BERT architecture + vocabulary per tower (no preset needed to load)
    model.weights.h5     every weight, text caches included
    metrics.json         written by the loop: per-epoch history and final figures
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Mapping

import tensorflow as tf

from common import staging
from trainer.config import ConfigError, TrainConfig
from trainer.features import ModelAssets
from trainer.model import TwoTowerModel, build_model
from trainer.text_encoder import EncoderSpec

CONFIG_FILE = "config.json"
ASSETS_FILE = "assets.json"
ENCODERS_FILE = "encoders.json"
WEIGHTS_FILE = "model.weights.h5"
METRICS_FILE = "metrics.json"


def _write_json(path: str, value: object) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(value, indent=2, sort_keys=True))


def _read_json(path: str) -> object:
    if not tf.io.gfile.exists(path):
        raise ConfigError(
            f"{os.path.dirname(path)} is not a trained model dir: no {os.path.basename(path)}"
        )
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def _local_weights_path() -> str:
    # h5py reads and writes local files only: remote weights pass through /tmp.
    return os.path.join("/tmp", f"{uuid.uuid4().hex}.weights.h5")


def save_trained(
    model: TwoTowerModel,
    config: TrainConfig,
    model_dir: str,
    extra_files: Mapping[str, object] | None = None,
) -> str:
    """Writes the model dir (layout in the module docstring) atomically; returns ``model_dir``.

    Everything goes to a temporary sibling first, then replaces ``model_dir`` (an older model
    there is moved aside and removed only after the rename), so readers never see half a model.
    ``extra_files``: more JSON files to write beside (name -> value), e.g. ``metrics.json``.
    """
    model_dir = model_dir.rstrip("/")
    prefix = f".tmp-{os.path.basename(model_dir)}-"
    with staging.staged_dir(model_dir, replace=True, prefix=prefix) as tmp:
        _write_json(os.path.join(tmp, CONFIG_FILE), config.to_dict())
        _write_json(os.path.join(tmp, ASSETS_FILE), dataclasses.asdict(model.assets))
        _write_json(os.path.join(tmp, ENCODERS_FILE), model.encoder_specs)
        weights = os.path.join(tmp, WEIGHTS_FILE)
        if tmp.startswith("gs://"):
            local = _local_weights_path()
            model.save_weights(local)
            tf.io.gfile.copy(local, weights)
            os.remove(local)
        else:
            model.save_weights(weights)
        for name, value in (extra_files or {}).items():
            _write_json(os.path.join(tmp, name), value)
    return model_dir


def load_trained(model_dir: str) -> tuple[TwoTowerModel, TrainConfig]:
    """Rebuilds the trained model from a model dir (no preset, wheel or data dir needed)."""
    config = TrainConfig.from_dict(_read_json(os.path.join(model_dir, CONFIG_FILE)))
    assets = ModelAssets(**_read_json(os.path.join(model_dir, ASSETS_FILE)))
    specs = [EncoderSpec(**s) for s in _read_json(os.path.join(model_dir, ENCODERS_FILE))]
    if config.model.freeze_bert is None or config.model.cache_text is None:
        raise ConfigError(f"{model_dir}/{CONFIG_FILE}: the saved config is not resolved")
    if config.model.popularity_prior is None:  # saved before the prior existed: none
        config.model.popularity_prior = False
    if config.model.item_item is None:  # saved before the item-item term existed: none
        config.model.item_item = False
    model = build_model(config.model, assets, encoder_specs=specs, fill_caches=False)
    weights = os.path.join(model_dir, WEIGHTS_FILE)
    if not tf.io.gfile.exists(weights):
        raise ConfigError(f"{model_dir} is not a trained model dir: no {WEIGHTS_FILE}")
    local = weights
    if weights.startswith("gs://"):
        local = _local_weights_path()
        tf.io.gfile.copy(weights, local)
    try:
        model.load_weights(local)
    except (ValueError, KeyError, OSError) as e:
        # Keras lists every unmatched layer; the first lines say enough.
        detail = " ".join(str(e).split())[:300]
        raise ConfigError(
            f"{weights} does not fit the model its {CONFIG_FILE} describes (written by another "
            f"version of this code, or a damaged file): {detail}"
        ) from e
    finally:
        if local != weights:
            os.remove(local)
    return model, config


def copy_model_dir(source: str, destination: str) -> None:
    """Copies a local model dir (tests, export staging)."""
    shutil.copytree(source, destination)
