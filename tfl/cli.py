"""The command line: every absl flag, and the one place flag values become a Config.

Only ``main.py`` passes the global ``absl.flags.FLAGS`` here; nothing else in tfl reads flags.
"""

from __future__ import annotations

import sys

from absl import flags

from tfl import config as config_lib
from tfl import backbones, strategies
from tfl.data import sources

_SECTIONS = {
    "data": config_lib.DataConfig,
    "model": config_lib.ModelConfig,
    "freeze": config_lib.FreezeConfig,
    "train": config_lib.TrainConfig,
    "compare": config_lib.CompareConfig,
    "predict": config_lib.PredictConfig,
    "rank": config_lib.RankConfig,
    "auto": config_lib.AutoConfig,
}
_TOP_LEVEL = ("mode", "model_dir", "seed", "export", "overwrite")
# Flags that only some modes read: given with another --mode (on the command line or in a flagfile), they
# would change nothing, so the run stops and says so.
MODES_READING = {
    **{name: ("compare",) for name in ("strategies", "seeds", "label_fractions")},
    "probe_learning_rate": ("compare", "auto"),
    **{name: ("rank", "auto") for name in ("backbones", "rank_examples", "depths")},
    "budget_minutes": ("auto", "tune"),
    **{name: ("predict",) for name in ("input", "output")},
    "label_descriptions": ("zero_shot", "self_train", "auto", "compare"),  # compare: its zero-shot/self-training
}
# --mode=auto --nolabels ranks nothing (zero-shot, then self-training), so these would change nothing. Not
# --rank_examples: configs/auto_rotten_tomatoes.flags sets it for its labelled run and says to add --nolabels.
UNREAD_WITHOUT_LABELS = ("backbones", "depths", "probe_learning_rate")

# Help strings, one per Config field; the defaults come from the dataclasses themselves. The flags that
# name an extension point get theirs from its table when the flags are defined (table_help).
HELP = {
    "text_column": "csv/jsonl: column with the text (or image path).",
    "label_column": "csv/jsonl: column with the label ('a|b' lists for multilabel).",
    "train_split": "tfds: training split (slicing allowed, e.g. train[:80%]). tfds splits are read into memory, "
                   "so --max_examples, --classes, --label_fraction and --seed act on them as on any source; slice "
                   "large data sets here.",
    "validation_split": "tfds: validation split; empty = a stratified --validation_fraction carved from the train "
                        "split (from --seed).",
    "test_split": "tfds: test split.",
    "validation_fraction": "Share held out for validation where a source has no validation split: of the pool, or, "
                           "for sources with their own test split, validation_fraction / (1 - test_fraction) of "
                           "train (11.1% by default, as if the whole were split 80/10/10); stratified, from --seed.",
    "test_fraction": "Share of the pool held out for testing where a source has no test split.",
    "max_examples": "Cap on examples for quick runs (the pool before splitting, or each given split), drawn "
                    "stratified by label from --seed; 0 = all.",
    "classes": "Keep only these label ids, renumbered 0..k-1 (e.g. 0,1,2,3,4).",
    "num_words": "keras:imdb/reuters and lstm: vocabulary size.",
    "maxlen": "keras:imdb/reuters and lstm: tokens per example. With --transfer of an lstm source, the target's "
              "length, whatever the source's (the LSTM's weights do not depend on it): set it for the target's texts.",
    "batch_size": "Global batch size (split across replicas).",
    "eval_batch_size": "Global batch size for validation and test (0 = --batch_size). Larger is faster for small models where per-batch overhead dominates (an LSTM steps through every token per batch); the metrics do not change.",
    "shuffle_buffer": "tf.data shuffle buffer size.",
    "cache": "Cache preprocessed examples in memory.",
    "bucket_shapes": "Tokenized text: batch by length and pad to at most this many boundaries (from the training "
                     "data's lengths); 0 = pad everything to --sequence_length.",
    "tokens_per_batch": "With length buckets (--bucket_shapes): each training batch holds about this many padded "
                        "tokens, batch = tokens // the bucket's length (a multiple of the replica count), so short "
                        "texts come in larger batches and an epoch takes fewer steps; 0 = --batch_size examples "
                        "per batch. Validation and test keep --eval_batch_size. Each step's loss is its batch's "
                        "mean, so an example in a large (short-text) batch weighs less in its step than one in a "
                        "small batch.",
    "weights": "keras.applications weights: imagenet, none or a .weights.h5 path.",
    "pretrained": "Load the backbone's pretrained weights; --nopretrained trains the same architecture from scratch.",
    "task": "classification, multilabel or regression.",
    "sequence_length": "Text backbones: tokens per example after the tokenizer.",
    "image_size": "Image backbones: input size in pixels; 0 = the backbone's own.",
    "pooling": "Text encoders: mean (over real tokens), cls, or pooled (the backbone's pooler).",
    "head_dropout": "Dropout before the output layer.",
    "head_hidden_units": "Units of an extra hidden Dense layer in the head; 0 = none.",
    "lstm_units": "lstm: LSTM units (the seed model: 100).",
    "embedding_dim": "lstm: embedding size (the seed model: 50).",
    "freeze_all": "Freeze the whole backbone (linear probe): only the head trains.",
    "freeze_blocks": "Freeze the first N blocks of the backbone (embeddings first).",
    "trainable": "Regex on 'block/layer' names: matching layers train, all other backbone layers are frozen.",
    "unfreeze_every_epochs": "Gradual unfreezing: start with the head only, unfreeze one more block from the "
                             "top every K epochs; 0 = off.",
    "layer_lr_decay": "Layer-wise learning-rate decay: block at depth d from the top gets lr * decay**d; 1 = off.",
    "lora_rank": "Train rank-r LoRA adapters instead of the backbone's weights (keras-hub backbones); 0 = off.",
    "epochs": "Training epochs.",
    "learning_rate": "Peak learning rate of AdamW.",
    "weight_decay": "AdamW weight decay.",
    "warmup_fraction": "Share of the steps spent warming the learning rate up linearly.",
    "lr_schedule": "linear, cosine or constant after warm-up.",
    "precision": "auto, float32, mixed_bfloat16 or mixed_float16 (auto: bf16 on TPU and bf16-native CPUs, "
                 "by compute capability on GPUs).",
    "jit_compile": "auto, true or false (XLA; auto: on for GPU/TPU; on a CPU only where benchmarks/run.py measured "
                   "it faster here and, for length-bucketed text, where the steps it speeds outweigh compiling each "
                   "batch shape).",
    "strategy": "auto, default, mirrored (local GPUs), multi_worker (processes or machines named by TF_CONFIG; "
                "the chief writes the run) or tpu. auto: tpu with --tpu, multi_worker with TF_CONFIG, mirrored "
                "with several GPUs.",
    "tpu": "TPU address for --strategy=tpu: local, a grpc:// address or a TPU name.",
    "early_stopping_patience": "Stop after this many epochs without a better validation loss; 0 = off.",
    "steps_per_execution": "Training steps run per tf.function call.",
    "gradient_accumulation_steps": "Update the weights once every N batches, from their mean gradient: with "
                                   "--batch_size cut N-fold, the same effective batch in less memory "
                                   "where the activations are what fills memory (docs/memory.md measures it per "
                                   "precision); 1 = every batch. One device only. With --unfreeze_every_epochs, "
                                   "keep steps per epoch a multiple of N: a new stage drops a part-filled sum.",
    "max_steps_per_epoch": "Cap on steps per epoch (quick runs); 0 = a full pass.",
    "label_fraction": "Keep this share of the training split (1 = all), stratified by class and drawn from --seed; "
                      "multilabel and regression labels are drawn without stratification.",
    "transfer": "structure (the source model's architecture, fresh weights) or parameter (also its weights and "
                "vocabulary; the head is re-initialised). Needs --source_model.",
    "transfer_vocabulary": "Parameter transfer of a text model: source (the default: the source's vocabulary as is; "
                           "words it never saw become out-of-vocabulary) or target (a vocabulary fitted on the "
                           "new task's labelled texts; embedding rows copied for the tokens it shares with the "
                           "source). The default is what won on the related pair IMDB -> Rotten Tomatoes "
                           "(docs/imdb_to_rt_variants.md, benchmarks/transfer_variants.py): with few labels a "
                           "vocabulary fitted on them is tiny. Freezing the transferred embedding "
                           "(--freeze_blocks=1) or every transferred layer (--freeze_all) measured no better than "
                           "training them all, so transferred layers train (at --learning_rate) unless frozen.",
    "transfer_head": "Parameter transfer: new (the default: a freshly initialised head) or source (the source "
                     "model's head, so target class i starts as source class i: for a target with the same classes "
                     "in the same order, e.g. negative/positive sentiment; an error if the class counts differ). "
                     "On IMDB -> Rotten Tomatoes it was best on the mean at a lower learning rate, but within the "
                     "spread over seeds (docs/imdb_to_rt_variants.md), so new stays the default.",
    "source_model": "--model_dir of a finished lstm or small_cnn run (its source_model/ folder).",
    "label_descriptions": "Zero-shot and self_train: a JSON file {label: [descriptions]} or 'label=desc|desc;label=desc'; "
                          "default: templates of the label names.",
    "pseudo_label_share": "--mode=self_train (and auto --nolabels): after the probe rounds, fine-tune the encoder "
                          "(--epochs, --learning_rate) on this share of the training texts that zero-shot is surest "
                          "of, balanced per class, with their zero-shot labels (validation only scores, and with "
                          "--early_stopping_patience picks the epoch); 0 = the probe only.",
    "probe_learning_rate": "--mode=compare (and auto's probe): learning rate of the linear_probe strategy (head only).",
    "seeds": "--mode=compare: runs per strategy (seeds --seed, --seed+1, ...).",
    "label_fractions": "--mode=compare: shares of the labelled training split to learn from, e.g. 0.05,0.2,1.0.",
    "mode": "train (one run), zero_shot (no training: similarity to label descriptions), self_train (no labels: "
            "zero-shot pseudo-labels on the unlabelled training texts, then rounds of a linear probe), compare "
            "(a transfer report over --strategies), predict (a finished run's export on --input) or rank "
            "(transferability estimates of --backbones at every depth: rank.md/json, no training) or auto (rank, "
            "then choose backbone, depth and strategy within --budget_minutes and run the choice: report.md) or "
            "tune (a KerasTuner Hyperband search over learning rate, epochs, frozen blocks and LoRA rank for "
            "--backbone within --budget_minutes: report.md with every trial).",
    "backbones": "--mode=rank and auto: candidates, comma-separated: asset:minilm, asset:minilm_l3, "
                 "asset:efficientnet_lite0, "
                 "keras-hub encoder presets or folders, lstm/small_cnn run folders; each at every depth plus a "
                 "randomly initialised control. Empty = the offline zoo for the data's modality (and --source_model).",
    "budget_minutes": "--mode=auto: minutes for the whole run (ranking, then the chosen training); the choice "
                      "of depth and strategy fits what the ranking leaves (estimated from its forward pass). "
                      "--mode=tune: minutes for the search; a trial starts only if it should end in time.",
    "labels": "--nolabels: the training split's labels are not used (--mode=auto: zero-shot by label descriptions, "
              "then self-training on the unlabelled training texts; validation and test labels only score).",
    "backbone_depth": "keras-hub text encoders: keep only the first N transformer blocks, the features after "
                      "block N mean- or cls-pooled (--mode=rank's depth N, which --mode=auto picks); 0 = all.",
    "rank_examples": "--mode=rank and auto: score on at most this many training examples, drawn stratified from "
                     "--seed.",
    "depths": "--mode=rank and auto: which depths of each backbone to score: all (every block; 0 = the "
              "embeddings alone), "
              "last (each backbone's output) or a comma list such as 1,3. Random-init controls are always scored.",
    "input": "--mode=predict: a text, csv:<path> or jsonl:<path> (the --text_column), or images:<folder>.",
    "output": "--mode=predict: where to write the predictions CSV (input, label, p(<class>) ...); empty = stdout.",
    "save_every_steps": "Save the resume state (weights, optimizer, epoch) every N steps too; 0 = at epoch ends only.",
    "deterministic": "Enable TensorFlow op determinism: two runs with the same --seed give identical metrics.",
    "cache_frozen_features": "With --freeze_all, compute the backbone's features once and train the head on them.",
    "model_dir": "Where checkpoints, logs, metrics.json, model.keras and export/<version>/ go (needed by "
                 "--mode=compare and tune, which write several runs under it).",
    "seed": "Seed for splits, initialisation and shuffling.",
    "export": "Export a SavedModel with a raw-input serving signature.",
    "overwrite": "Start over in a --model_dir that holds a tfl run (with a different config): clears it first. "
                 "Only a folder with tfl's run marker (or an empty one) is cleared; any other folder is refused.",
}


def table_help() -> dict:
    """Help of the flags that name an extension point, built from its one table (read at call time)."""
    return {"source": sources.sources_help(), "backbone": backbones.backbones_help(),
            "strategies": strategies.strategies_help()}


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defines one flag per Config field, with the dataclass default and a help string."""
    help_texts = {**HELP, **table_help()}
    for section in _SECTIONS.values():
        for field in section.__dataclass_fields__.values():
            _define(flag_values, field.name, field.default, help_texts[field.name])
    for name in _TOP_LEVEL:
        _define(flag_values, name, config_lib.Config.__dataclass_fields__[name].default, help_texts[name])


def _define(flag_values, name, default, help_text):
    if isinstance(default, bool):
        flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
    elif isinstance(default, int):
        flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
    elif isinstance(default, float):
        flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
    elif isinstance(default, tuple):
        flags.DEFINE_list(name, [str(v) for v in default], help_text, flag_values=flag_values)
    else:
        flags.DEFINE_string(name, default, help_text, flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues) -> config_lib.Config:
    """The one place flag values turn into the Config."""
    sections = {}
    for key, section in _SECTIONS.items():
        values = {name: flag_values[name].value for name in section.__dataclass_fields__}
        for name, cast in [("classes", int), ("label_fractions", float), ("strategies", str), ("backbones", str)]:
            if name in values:
                try:
                    values[name] = tuple(cast(v) for v in values[name])
                except ValueError:
                    raise config_lib.ConfigError(f"--{name}={','.join(values[name])} must be a comma-separated "
                                                 f"list of {cast.__name__} values")
        sections[key] = section(**values)
    mode = flag_values["mode"].value
    ignored = [name for name, modes in MODES_READING.items() if flag_values[name].present and mode not in modes]
    if ignored and mode in config_lib.MODES:  # an unknown --mode is reported as such, by validate()
        readers = ", ".join(f"--{name} (--mode={' or '.join(MODES_READING[name])})" for name in ignored)
        them = "it" if len(ignored) == 1 else "them"
        raise config_lib.ConfigError(f"{readers} would change nothing with --mode={mode}: drop {them}, or use a "
                                     f"mode that reads {them}")
    unread = [name for name in UNREAD_WITHOUT_LABELS if flag_values[name].present]
    if mode == "auto" and not flag_values["labels"].value and unread:
        raise config_lib.ConfigError(f"{', '.join('--' + n for n in unread)}: --mode=auto --nolabels ranks nothing "
                                     "(zero-shot by --label_descriptions, then self-training on --backbone): drop "
                                     f"{'it' if len(unread) == 1 else 'them'}, or give labels")
    return config_lib.Config(**sections, **{n: flag_values[n].value for n in _TOP_LEVEL})


def parse_flags_or_exit(argv: list, flag_values: flags.FlagValues) -> list:
    """absl parsing, but a bad flag or flagfile prints one line naming the fix and exits 2."""
    try:
        return flag_values(argv)
    except SystemExit as e:  # absl exits 1 after printing --help/--helpfull; asking for help is no error
        sys.exit(0 if e.code == 1 and any(a.startswith("--help") for a in argv) else e.code)
    except flags.Error as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}. See `python main.py --helpfull` for the flags, or fix the --flagfile path.",
              file=sys.stderr)
        sys.exit(2)
