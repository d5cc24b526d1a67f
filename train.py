"""Fine-tune Stable Diffusion (UNet and CLIP text encoder) from a train.json.

    python train.py --config train.json [--key value ...]

Every train.json key is also a --key value option; `--help` lists them, doc/CONFIG.md documents them.
"""
from __future__ import annotations

import errno
import sys


def main(argv: list[str] | None = None) -> int:
    from utils.run.config import ConfigError, config_to_dict, help_text, load_config
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, flags = load_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if flags.get("help"):
        print(help_text())
        return 0
    if flags.get("print-config"):
        import json
        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0
    from utils.run.loop import cleanup, train
    from utils.run.preflight import preflight
    from utils.run.setup import setup
    run = None
    try:
        if flags.get("check"):
            from utils.run.check import check_data
            return check_data(cfg)
        run = preflight(cfg, config_path=flags.get("config"))   # the config against this machine; loads nothing
        setup(run)                                               # data, model, optimizers: utils/run/setup.py
        return train(run)                                        # the loop: utils/run/loop.py
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        # any write (checkpoint, single file, logs): completed checkpoints are renamed into place only when whole
        print(f"error: disk full writing {e.filename or 'the run folder'}: free space and resume from the last "
              f"checkpoint (--resume_ckpt findlast)", file=sys.stderr)
        return 2
    finally:
        if run is not None:
            cleanup(run)


if __name__ == "__main__":
    sys.exit(main())
