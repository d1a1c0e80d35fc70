"""Entry point: ``python -m trainer.task --data DIR --split p1|p2|p3 --model-dir DIR [...]``.

Exit codes: 0 trained (model dir written by the chief); 2 bad configuration or data (one
``error:`` line, no traceback); 128 + N stopped by signal N after saving a checkpoint (run the
same command again to resume).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from common.cli import run as run_command
from trainer.config import ConfigError, TrainConfig
from trainer.flags import parse_args

log = logging.getLogger("trainer")


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("trainer")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def run(config: TrainConfig):
    """Sets up the environment and trains; returns the :class:`trainer.loop.TrainResult`."""
    from trainer import env as env_lib

    info = env_lib.cluster_info()
    dirs = env_lib.output_dirs(config.runtime, info)
    strategy = env_lib.make_strategy(config.runtime.strategy, info)  # before any other TF op
    has_gpu = env_lib.gpu_count() > 0
    config = config.resolve(has_gpu=has_gpu)
    config.validate(num_replicas=strategy.num_replicas_in_sync)
    precision = env_lib.configure_precision(config.runtime.mixed_precision)
    role = f"{info.task_type}:{info.task_id}" if info.task_type else "single process"
    log.info(
        "%s, %s with %d replica(s)%s",
        role,
        type(strategy).__name__,
        strategy.num_replicas_in_sync,
        ", GPU" if has_gpu else ", CPU only",
    )
    from trainer.loop import train

    result = train(config, strategy, info, dirs, precision)
    if getattr(result, "model_dir", None):
        from trainer import model_card  # data, protocol, figures, limits beside the weights

        log.info("model card: %s", model_card.write_model_dir_card(result.model_dir))
    return result


def _as_data_error(config: TrainConfig, error: Exception) -> Exception:
    """A streaming DataLossError (TF names no file) as a DataError naming the damaged file."""
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(error, tf.errors.DataLossError):
        from trainer.data.records import data_loss_error

        return data_loss_error(config.data.data, error)
    return error


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    return run_command(lambda: _train(argv))


def _train(argv: Sequence[str] | None) -> int:
    """Parses, trains; the exit status (128 + N: stopped by signal N after a checkpoint)."""
    config = parse_args(argv)
    if not config.data.data:
        raise ConfigError("--data is required")
    try:
        result = run(config)
    except Exception as e:
        mapped = _as_data_error(config, e)
        if mapped is e:
            raise
        raise mapped from e
    if result.status == "interrupted":
        return 128 + (result.signum or 15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
