"""Ray job: fine-tune a network on labelled images (Ray Train, DDP); resumes after a kill.

    fc7 finetune DATA --out DIR [options]
    ray job submit --working-dir . -- python jobs/finetune.py DATA --out DIR [options]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `ray job submit`

import ray  # noqa: E402

from jobs import run  # noqa: E402
from pipeline.config import parse_config  # noqa: E402
from pipeline.extract import start_ray, stop_ray  # noqa: E402
from pipeline.finetune import (  # noqa: E402
    RAY_STORAGE,
    FinetuneConfig,
    TrainJob,
    choose_path,
    fit,
    load_data,
    prepare_output,
    run_key,
    write_outputs,
)
from pipeline.finetune.train import CHECKPOINTS  # noqa: E402
from pipeline.model import load_weights  # noqa: E402
from pipeline.provenance import preprocessing_for  # noqa: E402

EPILOG = """examples:
  fc7 finetune photos/ --out ft/                    ImageNet AlexNet, fc6+fc7+new head trained
  fc7 finetune photos/ --out ft/ --augment light --freeze none --num-workers 4
  fc7 extract photos/ --layer pool5 --out pool5/ && fc7 finetune photos/ --out ft/ \\
      --embeddings pool5/              no decoding, no convolutions
  fc7 predict ft/ --image cat.jpg
Run the same command again to resume an interrupted run from its last epoch."""


def main(argv: list[str] | None = None) -> int:
    config = parse_config(FinetuneConfig, argv, "fc7 finetune",
                          "Fine-tune a network on labelled images, on Ray Train.", EPILOG)
    weights = load_weights(config.weights, config.model)
    preprocessing = preprocessing_for(config.model)
    path = choose_path(config)
    data, array = load_data(config.data, path[0], weights, preprocessing, config.val_fraction,
                            config.seed, config.embeddings, config.decode_threads)
    print(f"path: {path[0]} ({path[1]})")
    print(f"data: {len(data.train)} train, {len(data.val)} validation images in "
          f"{len(data.classes)} classes; {len(data.skipped)} skipped"
          + (f" (e.g. {data.skipped[0][0]}: {data.skipped[0][1]})" if data.skipped else ""))
    out, key = Path(config.out).resolve(), run_key(config, data, weights)
    state = prepare_output(out, key, config.overwrite)
    if state.complete:
        print(f"fc7 finetune: {out} is already complete; nothing to do")
        return 0
    if state.resume_epoch and state.resume_epoch <= config.epochs:
        print(f"resuming at epoch {state.resume_epoch}")
    # With the dashboard: Ray Train's placement-group cleaner asks its state API whether the
    # run still lives, and without one warns every 2 s that it cannot.
    started = config.num_workers > 0 and start_ray(dashboard=True)
    try:
        share = ray.put if config.num_workers > 0 else (lambda value: value)
        job = TrainJob(config, data.classes, data.labels, data.train, data.val, path[0],
                       share(array), share(weights.state_dict), preprocessing,
                       str(out / CHECKPOINTS), key)
        del array
        fit(job, str(out / RAY_STORAGE))
    finally:
        if started:
            stop_ray()
    manifest = write_outputs(out, config, data, weights, preprocessing, path, key)
    best = manifest["curves"][manifest["best_epoch"] - 1]
    print(f"fine-tuned {config.model} into {out}: best epoch {manifest['best_epoch']} of "
          f"{manifest['epochs_run']}{' (stopped early)' if manifest['stopped_early'] else ''}, "
          f"val loss {best['val_loss']:.4f}, val accuracy {best['val_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run("finetune", main, None))
