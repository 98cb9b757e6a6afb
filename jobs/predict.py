"""`fc7 predict`: label embeddings (into Parquet) or image files with a trained classifier.

fc7 predict out/classifier out/embeddings --out out/predictions
fc7 predict out/classifier --image photo1.jpg photo2.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `ray job submit` and python

from pipeline.classify import Classifier, PredictConfig, predict_dataset  # noqa: E402
from pipeline.cli import run
from pipeline.config import add_option, load_config, new_parser  # noqa: E402
from pipeline.errors import SourceError  # noqa: E402
from pipeline.sources import read_image_bytes  # noqa: E402
from pipeline.store import EmbeddingDataset  # noqa: E402

EPILOG = """examples:
  fc7 predict out/clf out/embeddings --out out/predictions --top-k 3
  fc7 predict out/clf --image cat.jpg dog.png
exit status: 1 when an --image could not be read or decoded (the others are still printed)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "fc7 predict", "Label embeddings or image files with a trained classifier.", EPILOG
    )
    parser.add_argument(
        "model_dir", nargs="?", metavar="MODEL_DIR", help="folder written by fc7 train"
    )
    parser.add_argument(
        "embeddings",
        nargs="?",
        metavar="EMBEDDINGS",
        help="extraction output to label (or use --image)",
    )

    def option(flag: str, text: str, **kwargs) -> None:
        add_option(parser, flag, PredictConfig, text, **kwargs)

    option("--out", "folder for the predictions Parquet", metavar="PRED_DIR")
    option(
        "--image",
        "image files to embed with the recorded model and label",
        nargs="+",
        metavar="PATH",
    )
    option("--top-k", "best labels kept per row", type=int, metavar="K")
    option("--batch-size", "rows per Parquet batch", type=int)
    option("--device", "auto, cpu or cuda, for --image")
    option(
        "--overwrite",
        "replace the predictions in --out (deletes only fc7 prediction parts)",
        action="store_true",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    config = load_config(PredictConfig, build_parser().parse_args(argv))
    classifier = Classifier.load(config.model_dir)
    if config.embeddings:
        data = EmbeddingDataset.open(config.embeddings)
        counts = predict_dataset(
            classifier,
            data,
            config.out,
            config.model_dir,
            config.top_k,
            config.batch_size,
            config.overwrite,
        )
        print(
            f"labelled {counts['predicted']} of {counts['rows']} rows "
            f"({counts['errors']} with an extraction error) into {config.out}"
        )
        return 0
    images, unreadable, failed = [], {}, 0
    for path in config.image:
        try:
            images.append(read_image_bytes(path))
        except (OSError, ValueError) as err:
            reason = getattr(err, "strerror", None) or err
            if len(config.image) == 1:
                raise SourceError(f"--image {path}: cannot read: {reason}") from err
            images.append(b"")  # reported below as unreadable, not as an empty file
            unreadable[path] = f"cannot read: {reason}"
    results, errors = classifier.predict_images(images, config.top_k, config.device)
    for path, top, error in zip(config.image, results, errors, strict=True):
        if top is None:
            failed += 1
            print(f"{path}\terror: {unreadable.get(path, error)}", file=sys.stderr)
            continue
        best = ", ".join(f"{label} {score:.3f}" for label, score in top)
        print(f"{path}\t{top[0][0]}\t{top[0][1]:.4f}\t(top: {best})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run("predict", main, None))
