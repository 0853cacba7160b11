"""One frozen Config for a run: plain dataclasses, defaults, and validation before any heavy work.

``main.py`` builds it from flags; library users can build it directly::

    config = tfl.Config(data=tfl.DataConfig(source="asset:rotten_tomatoes"),
                        model=tfl.ModelConfig(backbone="lstm"), model_dir="/tmp/run")
    config.validate()
"""

from __future__ import annotations

import dataclasses
import json
import re

from tfl.data.sources import DATA_SOURCES  # --source kinds, one table
from tfl.strategies import STRATEGIES as COMPARE_STRATEGIES  # --strategies (compare), one table

TASKS = ("classification", "multilabel", "regression")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
JIT_CHOICES = ("auto", "true", "false")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
LR_SCHEDULES = ("linear", "cosine", "constant")
POOLINGS = ("mean", "cls", "pooled")
TUNE_MIN_EPOCHS = 3  # Hyperband (factor 3) with fewer epochs has one bracket of one trial: a single random draw
MODES = ("train", "zero_shot", "self_train", "compare", "predict", "rank", "auto", "tune")
PSEUDO_LABEL_MODES = ("self_train", "auto", "compare")  # the modes --pseudo_label_share fine-tunes in
TRANSFERS = ("", "structure", "parameter")


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they are split and batched."""

    source: str = "asset:rotten_tomatoes"  # kind:name, e.g. tfds:glue/sst2, csv:/path/data.csv
    text_column: str = "text"  # csv/jsonl: the text (or image path) column
    label_column: str = "label"  # csv/jsonl: the label column
    train_split: str = "train"  # tfds split names (slicing allowed: train[:90%])
    validation_split: str = ""  # tfds: empty = carve validation_fraction out of train
    test_split: str = "test"
    validation_fraction: float = 0.1  # for sources without a validation split
    test_fraction: float = 0.1  # for sources without a test split
    max_examples: int = 0  # 0 = all; caps the pool before splitting (each split for pre-split sources)
    label_fraction: float = 1.0  # keep this stratified share of the training split (learning curves)
    labels: bool = True  # False: the training split counts as unlabelled (--mode=auto: zero-shot, self-training)
    classes: tuple = ()  # keep only these label ids (e.g. Fashion-MNIST 0..4), relabelled 0..k-1
    num_words: int = 10000  # keras:imdb / keras:reuters vocabulary size
    maxlen: int = 500  # keras:imdb / keras:reuters sequence length
    batch_size: int = 32
    eval_batch_size: int = 0  # validation/test batches; 0 = batch_size
    shuffle_buffer: int = 10000
    cache: bool = True
    bucket_shapes: int = 8  # tokenized text: pad batches to at most this many lengths; 0 = pad all to sequence_length
    tokens_per_batch: int = 0  # with length buckets: training batches of about this many padded tokens; 0 = batch_size


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The backbone and the head on top of it."""

    backbone: str = "lstm"  # keras-hub preset or folder, keras.applications name, lstm, small_cnn, asset:minilm
    backbone_depth: int = 0  # keras-hub text encoders: keep the first N transformer blocks; 0 = all
    weights: str = "imagenet"  # keras.applications: imagenet | none | <path>.weights.h5
    pretrained: bool = True  # False: the backbone's architecture with random weights (a scratch baseline)
    task: str = "classification"
    sequence_length: int = 128  # text backbones: tokens per example
    image_size: int = 0  # image backbones: 0 = the backbone's own input size
    pooling: str = "mean"  # text encoders: mean over tokens, the CLS token, or the backbone's pooler
    head_dropout: float = 0.1
    head_hidden_units: int = 0  # 0 = a single Dense layer on the pooled features
    lstm_units: int = 100  # the seed IMDB model: Embedding(num_words, 50) -> LSTM(100)
    embedding_dim: int = 50
    transfer: str = ""  # "" | structure | parameter (with source_model)
    source_model: str = ""  # the model_dir of a finished lstm/small_cnn run
    transfer_vocabulary: str = "source"  # parameter transfer of text: source (the source's vocabulary and ids
    # unchanged) | target (own vocabulary, embedding rows copied for shared tokens); source won on IMDB -> RT
    transfer_head: str = "new"  # parameter transfer: new (a fresh head) | source (the source's head, class i -> i)
    label_descriptions: str = ""  # zero-shot: JSON file or 'label=desc|desc;label=desc'; default from names


@dataclasses.dataclass(frozen=True)
class FreezeConfig:
    """Which blocks of the backbone train."""

    freeze_all: bool = False  # linear probe: only the head trains
    freeze_blocks: int = 0  # freeze the first N blocks (embeddings first)
    trainable: str = ""  # regex on layer names; matching layers train, others are frozen
    unfreeze_every_epochs: int = 0  # gradual unfreezing: one more block from the top every K epochs
    layer_lr_decay: float = 1.0  # learning rate x decay**(depth from the top) per block; 1 = off
    lora_rank: int = 0  # keras-hub LoRA on the backbone; 0 = off


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and devices."""

    epochs: int = 3
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    lr_schedule: str = "linear"
    precision: str = "auto"
    jit_compile: str = "auto"
    strategy: str = "auto"
    tpu: str = ""
    early_stopping_patience: int = 0  # 0 = off
    steps_per_execution: int = 1
    gradient_accumulation_steps: int = 1  # one update per N batches (their mean gradient); 1 = every batch
    max_steps_per_epoch: int = 0  # 0 = a full pass
    save_every_steps: int = 0  # resume state saved every N steps (and at epoch ends but the last); 0 = epoch ends
    deterministic: bool = False  # TF op determinism: identical metrics for identical runs (CPU)
    cache_frozen_features: bool = True  # linear probe: compute backbone features once, train the head on them
    pseudo_label_share: float = 0.0  # self_train: fine-tune the encoder on this surest share of pseudo-labels; 0 = off


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """--mode=compare: one target task under several strategies, same data, budget and seeds."""

    strategies: tuple = ("scratch", "linear_probe", "fine_tune")
    seeds: int = 3  # runs per strategy, seeds seed..seed+n-1
    label_fractions: tuple = ()  # e.g. (0.05, 0.2, 1.0): learning curves over labelled examples
    probe_learning_rate: float = 1e-2  # linear_probe only: a head alone needs a larger step than a fine-tune


@dataclasses.dataclass(frozen=True)
class RankConfig:
    """--mode=rank: transferability estimates of a zoo of candidates on the training split (tfl.ranking)."""

    backbones: tuple = ()  # empty = the offline zoo for the data's modality; else presets, folders, run folders
    rank_examples: int = 2000  # features of at most this many training examples (stratified)
    depths: str = "all"  # all | last | a comma list of depths, e.g. "1,3"


@dataclasses.dataclass(frozen=True)
class AutoConfig:
    """--mode=auto (rank, choose backbone, depth and strategy, run the choice: tfl.auto) and --mode=tune (a
    Hyperband search: tfl.tuning), each within a budget."""

    budget_minutes: float = 30.0  # the whole run: auto's ranking and chosen training, or tune's trials


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """--mode=predict: a finished run's latest export applied to new inputs."""

    input: str = ""  # a text, csv:<path> / jsonl:<path> (--text_column), or images:<folder>
    output: str = ""  # CSV of predictions; empty = stdout


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run."""

    mode: str = "train"  # train | zero_shot | self_train | compare | predict | rank | auto | tune
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    freeze: FreezeConfig = FreezeConfig()
    train: TrainConfig = TrainConfig()
    compare: CompareConfig = CompareConfig()
    predict: PredictConfig = PredictConfig()
    rank: RankConfig = RankConfig()
    auto: AutoConfig = AutoConfig()
    model_dir: str = ""
    seed: int = 0
    export: bool = True
    overwrite: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def validate(self) -> "Config":
        """Raises ConfigError naming the first problem and its fix; returns self when valid."""
        d, m, f, t = self.data, self.model, self.freeze, self.train
        kind = d.source.split(":", 1)[0]
        if ":" not in d.source or kind not in DATA_SOURCES:
            raise ConfigError(
                f"--source='{d.source}' is not valid; expected <kind>:<name> with kind one of "
                f"{list(DATA_SOURCES)}, e.g. --source=asset:rotten_tomatoes")
        if kind != "tfds" and (d.train_split, d.validation_split, d.test_split) != ("train", "", "test"):
            raise ConfigError(f"--train_split, --validation_split and --test_split name splits of a tfds: source; "
                              f"--source={d.source} is split by --validation_fraction and --test_fraction: drop them")
        self._check_counts()
        if not 0.0 < d.validation_fraction < 1.0 or not 0.0 < d.test_fraction < 1.0 \
                or d.validation_fraction + d.test_fraction >= 1.0:
            raise ConfigError("--validation_fraction and --test_fraction must each be in (0, 1) and sum "
                              f"to less than 1; got {d.validation_fraction} and {d.test_fraction}")
        if not t.learning_rate > 0:
            raise ConfigError(f"--learning_rate must be > 0; got {t.learning_rate}")
        if not 0.0 <= m.head_dropout < 1.0:
            raise ConfigError(f"--head_dropout must be in [0, 1); got {m.head_dropout}")
        if not 0.0 < f.layer_lr_decay <= 1.0:
            raise ConfigError(f"--layer_lr_decay must be in (0, 1]; got {f.layer_lr_decay}")
        if not 0.0 <= t.warmup_fraction < 1.0:
            raise ConfigError(f"--warmup_fraction must be in [0, 1); got {t.warmup_fraction}")
        if not 0.0 <= t.pseudo_label_share <= 1.0:
            raise ConfigError(f"--pseudo_label_share must be in [0, 1] (0 = no fine-tune); got {t.pseudo_label_share}")
        if t.pseudo_label_share and self.mode not in PSEUDO_LABEL_MODES:
            raise ConfigError(f"--pseudo_label_share is for --mode=self_train, auto --nolabels or the compare strategy "
                              f"self_training; --mode={self.mode} does not use it: drop it")
        for name, value, choices in [("task", m.task, TASKS), ("precision", t.precision, PRECISIONS),
                                     ("jit_compile", t.jit_compile, JIT_CHOICES),
                                     ("strategy", t.strategy, STRATEGIES),
                                     ("lr_schedule", t.lr_schedule, LR_SCHEDULES),
                                     ("pooling", m.pooling, POOLINGS)]:
            if value not in choices:
                raise ConfigError(f"Unknown --{name}='{value}'; expected one of {list(choices)}")
        if f.freeze_all and (f.lora_rank or f.freeze_blocks or f.trainable or f.unfreeze_every_epochs):
            raise ConfigError("--freeze_all trains only the head, so it conflicts with --lora_rank, "
                              "--freeze_blocks, --trainable and --unfreeze_every_epochs; drop one of them")
        if f.lora_rank and (f.freeze_blocks or f.trainable):
            raise ConfigError("--lora_rank freezes the backbone's own weights already; drop --freeze_blocks/--trainable")
        if f.lora_rank and f.unfreeze_every_epochs:  # unfreezing a block would make its LoRA-frozen kernels train
            raise ConfigError("--lora_rank trains adapters on a frozen backbone, and --unfreeze_every_epochs would "
                              "unfreeze the backbone's own weights block by block: drop one of them")
        if m.source_model and not m.transfer and self.mode in ("train", "tune"):
            raise ConfigError("--source_model is read only with --transfer; add --transfer=parameter (its weights) or "
                              "--transfer=structure (its architecture), or drop --source_model")
        for name, value, choices in [("mode", self.mode, MODES), ("transfer", m.transfer, TRANSFERS),
                                     ("transfer_vocabulary", m.transfer_vocabulary, ("target", "source")),
                                     ("transfer_head", m.transfer_head, ("new", "source"))]:
            if value not in choices:
                raise ConfigError(f"Unknown --{name}='{value}'; expected one of {[c for c in choices if c]}")
        if m.transfer and not m.source_model:
            raise ConfigError(f"--transfer={m.transfer} needs --source_model=<model_dir of a finished lstm/small_cnn run>")
        if m.transfer_head == "source":  # the source's head: a single-layer classifier's, class i -> i
            compared = self.mode == "compare" and "parameter" in self.compare.strategies
            if m.transfer != "parameter" and not compared:
                raise ConfigError("--transfer_head=source reuses a source model's head: it needs --transfer=parameter "
                                  "(or the parameter strategy in --mode=compare)")
            if m.task != "classification" or m.head_hidden_units:
                raise ConfigError("--transfer_head=source needs --task=classification and --head_hidden_units=0 "
                                  "(the source's head is one classification layer); use --transfer_head=new")
        if not 0.0 < d.label_fraction <= 1.0:
            raise ConfigError(f"--label_fraction must be in (0, 1]; got {d.label_fraction} (no labels at all: "
                              "--mode=auto --nolabels)")
        self._check_mode_options()
        if d.tokens_per_batch:
            self._check_token_budget()
        if f.trainable:
            try:
                re.compile(f.trainable)
            except re.error as e:
                raise ConfigError(f"--trainable='{f.trainable}' is not a valid regular expression ({e})")
        if t.gradient_accumulation_steps > 1 and t.strategy in ("mirrored", "multi_worker", "tpu"):
            raise ConfigError(ACCUMULATION_ON_ONE_DEVICE)
        if t.strategy == "tpu" and not t.tpu:
            raise ConfigError("--strategy=tpu needs --tpu=local|<grpc address>|<TPU name>")
        return self

    def _check_counts(self) -> None:
        """Sizes and counts: each positive, or non-negative where 0 means off or automatic."""
        d, m, f, t = self.data, self.model, self.freeze, self.train
        for name, value in [("batch_size", d.batch_size), ("epochs", t.epochs), ("sequence_length", m.sequence_length),
                            ("gradient_accumulation_steps", t.gradient_accumulation_steps),
                            ("shuffle_buffer", d.shuffle_buffer), ("num_words", d.num_words), ("maxlen", d.maxlen),
                            ("lstm_units", m.lstm_units), ("embedding_dim", m.embedding_dim),
                            ("steps_per_execution", t.steps_per_execution)]:
            _check_positive(name, value)
        for name, value in [("eval_batch_size", d.eval_batch_size), ("max_examples", d.max_examples),
                            ("freeze_blocks", f.freeze_blocks), ("backbone_depth", m.backbone_depth),
                            ("lora_rank", f.lora_rank), ("unfreeze_every_epochs", f.unfreeze_every_epochs),
                            ("tokens_per_batch", d.tokens_per_batch),
                            ("bucket_shapes", d.bucket_shapes), ("image_size", m.image_size),
                            ("head_hidden_units", m.head_hidden_units), ("max_steps_per_epoch", t.max_steps_per_epoch),
                            ("early_stopping_patience", t.early_stopping_patience),
                            ("save_every_steps", t.save_every_steps), ("weight_decay", t.weight_decay)]:
            _check_non_negative(name, value)
        if len(set(d.classes)) != len(d.classes) or any(c < 0 for c in d.classes):
            raise ConfigError(f"--classes={','.join(map(str, d.classes))} names a class twice or a negative id; give "
                              "each label id to keep once, e.g. --classes=0,1,2")

    def _check_token_budget(self) -> None:
        """--tokens_per_batch: one batch size per length bucket, so the examples per step vary."""
        d, t = self.data, self.train
        if not d.bucket_shapes:
            raise ConfigError("--tokens_per_batch sizes each length bucket's batches: it needs --bucket_shapes > 0")
        if t.max_steps_per_epoch:
            raise ConfigError("--tokens_per_batch varies the examples per step, so --max_steps_per_epoch cannot count "
                              "the examples trained: drop one of them")
        if t.gradient_accumulation_steps > 1:
            raise ConfigError("--tokens_per_batch with --gradient_accumulation_steps would average batches of unequal "
                              "sizes as equals: drop one of them")
        if t.strategy == "tpu" or t.tpu:
            raise ConfigError("--tokens_per_batch gives each bucket its own batch size, and a TPU needs full batches "
                              "of one size: drop it on a TPU")
        if not self._trains_a_model():
            fine_tunes = " without --pseudo_label_share" if self.mode in PSEUDO_LABEL_MODES else ""
            raise ConfigError(f"--tokens_per_batch sizes training batches, and --mode={self.mode}{fine_tunes} trains "
                              "nothing: drop it")

    def _trains_a_model(self) -> bool:
        """Whether the run trains a model on batches (which --tokens_per_batch sizes)."""
        fine_tunes_pseudo_labels = self.train.pseudo_label_share > 0
        if self.mode in ("train", "tune"):
            return True
        if self.mode == "self_train":
            return fine_tunes_pseudo_labels
        if self.mode == "auto":  # --nolabels: zero-shot and a probe, and a fine-tune only with a share
            return self.data.labels or fine_tunes_pseudo_labels
        if self.mode == "compare":  # an unknown strategy name is reported later, as such
            return fine_tunes_pseudo_labels or any(getattr(COMPARE_STRATEGIES.get(s), "uses_labels", True)
                                                   for s in self.compare.strategies)
        return False  # zero_shot, rank, predict

    def _check_mode_options(self) -> None:
        """The options of one --mode (compare, rank, auto, predict)."""
        if not self.data.labels and self.mode not in ("auto", "zero_shot", "self_train"):
            raise ConfigError(f"--nolabels needs --mode=auto (zero-shot, then self-training), zero_shot or "
                              f"self_train; --mode={self.mode} learns from labels")
        if self.mode == "tune" and not self.model_dir:
            raise ConfigError("--mode=tune needs --model_dir (each trial is a run under <model_dir>/trials/)")
        if self.mode == "compare" and not self.model_dir:
            raise ConfigError("--mode=compare needs --model_dir (each strategy's runs go under <model_dir>/runs/, "
                              "the report beside them)")
        if self.mode == "compare" and self.freeze.unfreeze_every_epochs:
            raise ConfigError("--mode=compare sets each strategy's freezing itself, and --unfreeze_every_epochs would "
                              "change every strategy's (a partial fine-tune would no longer be partial): drop it")
        if not self.compare.probe_learning_rate > 0:
            raise ConfigError(f"--probe_learning_rate must be > 0; got {self.compare.probe_learning_rate}")
        if self.mode == "tune" and self.train.epochs < TUNE_MIN_EPOCHS:
            raise ConfigError(f"--mode=tune needs --epochs >= {TUNE_MIN_EPOCHS} (got {self.train.epochs}): Hyperband "
                              f"hands trials 1 epoch, then {TUNE_MIN_EPOCHS}; with fewer it runs a single trial")
        if not self.auto.budget_minutes > 0:
            raise ConfigError(f"--budget_minutes must be > 0; got {self.auto.budget_minutes}")
        unknown = [s for s in self.compare.strategies if s not in COMPARE_STRATEGIES]
        if unknown:
            raise ConfigError(f"Unknown strategy '{unknown[0]}' in --strategies; expected some of {list(COMPARE_STRATEGIES)}")
        if any(not 0.0 < x <= 1.0 for x in self.compare.label_fractions):
            raise ConfigError(f"--label_fractions must each be in (0, 1]; got {list(self.compare.label_fractions)}")
        _check_positive("seeds", self.compare.seeds)
        _check_positive("rank_examples", self.rank.rank_examples)
        if self.rank.depths not in ("all", "last") and not re.fullmatch(r"\d+(,\d+)*", self.rank.depths):
            raise ConfigError(f"--depths={self.rank.depths} is not valid; expected all, last or a comma list of "
                              "depths such as 1,3 (0 = the embeddings alone)")
        if self.mode == "predict" and not (self.model_dir and self.predict.input):
            raise ConfigError("--mode=predict needs --model_dir=<a finished run> and --input=<text|csv:path|"
                              "jsonl:path|images:folder>")


# Keras's accumulation runs an ops.cond that calls merge_call inside the train step's tf.function: fails with
# several replicas ("merge_call called while defining a new graph"), checked with 2 logical CPUs.
ACCUMULATION_ON_ONE_DEVICE = ("--gradient_accumulation_steps works on one device only (Keras's accumulation fails "
                              "under tf.distribute with several replicas): drop it, or use --strategy=default")


def _check_positive(name: str, value: int) -> None:
    if not value > 0:
        raise ConfigError(f"--{name} must be a positive number; got {value}")


def _check_non_negative(name: str, value: int) -> None:
    if value < 0:
        raise ConfigError(f"--{name} must be >= 0; got {value}")


def config_from_dict(values: dict) -> Config:
    """Rebuilds a Config from ``to_dict()`` output (e.g. a run's config.json)."""
    sections = {"data": DataConfig, "model": ModelConfig, "freeze": FreezeConfig, "train": TrainConfig,
                "compare": CompareConfig, "predict": PredictConfig, "rank": RankConfig, "auto": AutoConfig}
    kwargs = dict(values)
    for key, cls in sections.items():
        section = dict(kwargs.get(key, {}))
        for name, value in section.items():
            if isinstance(value, list):
                section[name] = tuple(value)
        kwargs[key] = cls(**section)
    return Config(**kwargs)
