"""Ray job: embed an image collection into Parquet.

    fc7 extract SOURCE --out DIR [options]
    ray job submit --working-dir . -- python jobs/extract.py SOURCE --out DIR [options]
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `ray job submit`

from tqdm import tqdm  # noqa: E402

from jobs import run  # noqa: E402
from pipeline.config import parse_config  # noqa: E402
from pipeline.extract import (  # noqa: E402
    ExtractConfig,
    ShardStats,
    choose_runner,
    pending_shards,
    prepare_output,
    run_shards,
    summary,
    write_plan,
)
from pipeline.extract.calibrate import prepare_int8  # noqa: E402
from pipeline.extract.dryrun import dry_run  # noqa: E402
from pipeline.model import load_weights, make_provenance, resolve_precision  # noqa: E402
from pipeline.sources import iter_inputs  # noqa: E402

EPILOG = """examples:
  fc7 extract photos/ --out embeddings/                   ImageNet weights, fc7, all cores/GPUs
  fc7 extract list.csv --out emb/ --layer fc6 --dtype float16
  fc7 extract photos/ --out emb/ --model resnet50            ResNet-50's avgpool (2048-d)
  fc7 extract photos/ --out emb/ --weights ft/model.pt       a network fc7 finetune trained
  fc7 extract s3://bucket/images --out s3://bucket/embeddings --num-workers 8
  fc7 extract photos/ --out emb/ --weights random --limit 100    smoke test, no download
  fc7 extract list.parquet --out emb/ --dry-run      plan, sum up and estimate; embed nothing
Run the same command again to resume an interrupted run."""


def main(argv: list[str] | None = None) -> int:
    config = parse_config(ExtractConfig, argv, "fc7 extract",
                          "Embed images with AlexNet (or --model) into Parquet.", EPILOG)
    weights = load_weights(config.weights, config.model)
    provenance = make_provenance(
        weights, config.layer, config.dtype,
        precision=resolve_precision(config.precision, config.device),
    )
    plan = prepare_output(config, provenance) or write_plan(
        config, provenance, iter_inputs(config.source)
    )
    if config.dry_run:
        print(dry_run(config, plan, weights).describe())
        return 0
    if plan.provenance.precision == "int8":
        plan, figures = prepare_int8(config, plan, weights)
        print(figures)
    shards = pending_shards(plan)
    if not shards:
        print(f"fc7 extract: {config.out} is already complete ({plan.inputs:,} images); "
              "nothing to do")
        return 0
    started = time.perf_counter()
    runner = choose_runner(config, plan.inputs)
    done = plan.inputs - sum(plan.shard_rows(shard) for shard in shards)
    with tqdm(total=plan.inputs, initial=done, unit="img", desc="embedding") as bar:
        def progress(shard: ShardStats, so_far: ShardStats) -> None:
            bar.update(shard.seen)
            bar.set_postfix(failed=so_far.failed)

        total = run_shards(config, plan, shards, progress, runner, weights, log=tqdm.write)
    print(summary(total, plan, time.perf_counter() - started, plan.shards - len(shards)))
    return 0


if __name__ == "__main__":
    sys.exit(run("extract", main, None))
