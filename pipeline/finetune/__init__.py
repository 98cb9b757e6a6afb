"""Fine-tuning a torchvision network on labelled images, on Ray Train (`fc7 finetune`).

Modules, in the order a run uses them:

    config   FinetuneConfig, the options; choose_path (images or pooled embeddings, and why)
    data     the labelled images: listed, decoded or looked up in pool5 embeddings, split
             (stratified), fingerprinted
    train    the per-worker training loop (DDP, global batch, per-epoch seeds, checkpoints) and
             `fit`, which runs it on Ray Train
    output   the fine-tune folder: resume or refuse, model.pt, manifest.json, curves.png
    predict  FinetunedModel: classify image files end to end

Example:
    >>> FinetunedModel.load("out/finetune").predict_files(["cat.jpg"], k=2)  # doctest: +SKIP
"""

from pipeline.finetune.config import FinetuneConfig, choose_path
from pipeline.finetune.data import LabelledData, load_data
from pipeline.finetune.output import (
    CURVES_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    RAY_STORAGE,
    prepare_output,
    run_key,
    write_outputs,
)
from pipeline.finetune.predict import FinetunedModel, is_finetune_dir
from pipeline.finetune.train import TrainJob, fit

__all__ = [
    "CURVES_FILE", "MANIFEST_FILE", "MODEL_FILE", "RAY_STORAGE", "FinetuneConfig",
    "FinetunedModel", "LabelledData", "TrainJob", "choose_path", "fit", "is_finetune_dir",
    "load_data", "prepare_output", "run_key", "write_outputs",
]
