"""--mode=zero_shot: the test split scored by similarity to label descriptions, with no training.

    metrics = tfl.zero_shot.run_zero_shot(config)   # writes <model_dir>/metrics.json
"""

from __future__ import annotations

import os
import time

import numpy as np

from tfl import backbones as backbones_lib
from tfl import data as data_lib
from tfl import devices, heads
from tfl import transfer as transfer_lib
from tfl.config import Config
from tfl.runner import load_data_for
from tfl.storage import write_json_atomically


def run_zero_shot(config: Config, verbose: int = 1) -> dict:
    """Scores the test split by similarity to label descriptions: no labels are used for training."""
    started = time.time()
    splits = load_data_for(config)
    precision = devices.resolve_precision(config.train.precision)
    backbone = backbones_lib.build_backbone(config.model.backbone, sequence_length=config.model.sequence_length,
                                            pooling="mean", dtype=precision)
    if backbone.modality != data_lib.TEXT or splits.modality != data_lib.TEXT:
        raise backbones_lib.BackboneError("--mode=zero_shot works on text data with a text encoder (asset:minilm "
                                          "or a keras-hub text preset); image zero-shot needs a CLIP/SigLIP preset")
    descriptions = transfer_lib.parse_label_descriptions(config.model.label_descriptions, splits.label_names)
    texts, labels = zip(*[(x.decode("utf-8"), y) for x, y in splits.test.as_numpy_iterator()])
    print(f"tfl: zero-shot: encoding {len(texts):,d} test texts and "
          f"{sum(len(d) for d in descriptions.values())} label descriptions with {config.model.backbone}")
    scores = transfer_lib.zero_shot_scores(transfer_lib.normalised_embeddings(backbone, texts),
                                           transfer_lib.label_embeddings(backbone, descriptions))
    num_labels = len(splits.label_names)
    probabilities = transfer_lib.zero_shot_probabilities(scores)
    outputs = probabilities[:, 1:] if heads.is_binary("classification", num_labels) else probabilities
    test = heads.evaluation_metrics("classification", num_labels, outputs, np.array(labels))
    metrics = {"test": test, "mode": "zero_shot", "label_descriptions": descriptions, "trainable_params": 0,
               "train_seconds": 0.0, "wall_seconds": round(time.time() - started, 2), "config": config.to_dict(),
               "data": {"source": config.data.source, "sizes": splits.sizes, "label_names": splits.label_names}}
    if config.model_dir and devices.is_chief():
        write_json_atomically(os.path.join(config.model_dir, "metrics.json"), metrics)
    print("tfl: zero-shot test " + ", ".join(f"{k}={v:.4f}" for k, v in test.items()))
    return metrics
