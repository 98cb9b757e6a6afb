"""`fc7 predict`: label embeddings (into Parquet) or image files with a trained classifier,
or image files with a fine-tuned network (`fc7 finetune`'s folder).

fc7 predict out/classifier out/embeddings --out out/predictions
fc7 predict out/classifier --image photo1.jpg photo2.png
fc7 predict out/finetune --image photo1.jpg photo2.png
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `ray job submit` and python

from jobs import run  # noqa: E402
from pipeline.classify import (  # noqa: E402
    Classifier,
    PredictConfig,
    predict_dataset,
    predict_image_files,
)
from pipeline.config import parse_config  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.finetune.predict import FinetunedModel, is_finetune_dir  # noqa: E402
from pipeline.store import EmbeddingDataset  # noqa: E402

EPILOG = """examples:
  fc7 predict out/clf out/embeddings --out out/predictions --top-k 3
  fc7 predict out/clf --image cat.jpg dog.png
  fc7 predict out/finetune --image cat.jpg          a fine-tuned network, end to end
exit status: 1 when an --image could not be read or decoded (the others are still printed)
"""


def main(argv: list[str] | None = None) -> int:
    config = parse_config(
        PredictConfig, argv, "fc7 predict",
        "Label embeddings or image files with a trained classifier or fine-tuned network.",
        EPILOG,
    )
    if is_finetune_dir(config.model_dir):
        if config.embeddings:
            raise ConfigError(f"{config.model_dir} is a fine-tuned network: it labels --image "
                              f"files, not embeddings")
        model = FinetunedModel.load(config.model_dir, config.device)
        return _print(model.predict_files(config.image, config.top_k))
    classifier = Classifier.load(config.model_dir)
    if config.embeddings:
        data = EmbeddingDataset.open(config.embeddings)
        counts = predict_dataset(
            classifier, data, config.out, config.model_dir, config.top_k, config.batch_size,
            config.overwrite,
        )
        print(
            f"labelled {counts['predicted']} of {counts['rows']} rows "
            f"({counts['errors']} with an extraction error) into {config.out}"
        )
        return 0
    return _print(predict_image_files(classifier, config.image, config.top_k, config.device))


def _print(results: list) -> int:
    failed = 0
    for result in results:
        if result.top is None:
            failed += 1
            print(f"{result.path}\terror: {result.error}", file=sys.stderr)
            continue
        best = ", ".join(f"{label} {score:.3f}" for label, score in result.top)
        print(f"{result.path}\t{result.top[0][0]}\t{result.top[0][1]:.4f}\t(top: {best})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run("predict", main, None))
