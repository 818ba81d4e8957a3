"""Typed settings for every recipe section: one dataclass a table, one documented field a key.

These are plain dataclasses so the core can be driven from Python without TOML. Each field carries
its one-line doc and its allowed range in `metadata`; smdlm_cli/recipe.py reads that metadata to
validate TOML and `--set` overrides generically, and to write recipe documentation.
What this is not: the TOML parser (recipe.py) or any logic that uses the values.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


def opt(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
        lo_open: bool = False, choices: tuple | None = None):
    """A recipe key: default, one-line doc, and the range recipe.py enforces.

    lo/hi bound numbers (lo exclusive when lo_open); choices bounds strings.
    """
    meta = {"doc": doc, "lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    preset: str = opt("tiny", "DiT size: tiny (tests, laptops), small (MDLM 169M), medium",
                      choices=("tiny", "small", "medium"))
    init: str = opt("", "weights to start from: a run directory, an MDLM directory or a hub name "
                        "(kuleshov-group/mdlm-owt); empty = random initialisation")
    length: int = opt(1024, "tokens per sequence block, BOS and EOS included", lo=4)
    hidden_size: int = opt(0, "width; 0 takes the preset's", lo=0)
    n_blocks: int = opt(0, "transformer blocks; 0 takes the preset's", lo=0)
    n_heads: int = opt(0, "attention heads; 0 takes the preset's", lo=0)
    cond_dim: int = opt(0, "adaLN conditioning width; 0 takes the preset's", lo=0)
    dropout: float = opt(0.1, "dropout after attention and MLP, as MDLM", lo=0.0, hi=0.9)
    causal: bool = opt(False, "train the same DiT as a left-to-right LM (causal attention, "
                              "next-token loss): the AR baseline and gen-PPL scorer")


@dataclass
class DataConfig:
    source: str = opt("python-stdlib", "python-stdlib (the interpreter's own .py files), sudoku "
                                       "(generated puzzles), an HF dataset name, or a local "
                                       ".txt/.jsonl/.parquet file or directory")
    subset: str = opt("", "HF dataset configuration name")
    split: str = opt("train", "HF split for training (slices allowed: train[:-100000])")
    valid_split: str = opt("", "HF split for validation; empty = hold out valid_fraction of documents")
    valid_fraction: float = opt(0.05, "share of documents (files, for python-stdlib) held out for "
                                      "validation when valid_split is empty", lo=0.0, hi=0.5,
                                lo_open=True)
    text_field: str = opt("text", "column or JSON key holding the text")
    streaming: bool = opt(False, "stream the HF dataset instead of downloading it whole")
    max_docs: int = opt(0, "use at most this many training documents; 0 = all", lo=0)
    tokenizer: str = opt("bpe", "bpe = train a byte-level BPE on the corpus, offline; "
                                "otherwise an HF tokenizer name or path (gpt2)")
    vocab_size: int = opt(4096, "vocabulary of the trained BPE, special tokens included; 258 = plain "
                                "bytes (256 + <|endoftext|> + [MASK], no merges)", lo=258)
    sudoku_givens: int = opt(36, "source sudoku: givens per puzzle (at least; a few more where "
                                 "uniqueness needs them); fewer is harder", lo=17, hi=80)
    sudoku_train: int = opt(100_000, "source sudoku: training puzzles", lo=1)
    sudoku_test: int = opt(1000, "source sudoku: held-out puzzles of `smdlm evaluate sudoku`", lo=1)


@dataclass
class SoftMaskConfig:
    enabled: bool = opt(True, "train with soft-masking (two passes); false = binary MDLM")
    k: int = opt(3, "top-k tokens mixed into a soft mask (3 for language, 1 for code)", lo=1)
    prob: float = opt(0.8, "p_sm: share of batches trained with SM, the rest binary", lo=0.0, hi=1.0)
    scale: float = opt(1e-6, "initial omega_s, the maximum of lambda", lo=0.0, hi=1.0)
    centre: float = opt(-0.75, "initial omega_b, the negative entropy where lambda is half its "
                               "maximum", hi=0.0)
    steepness: float = opt(6.66, "initial omega_a, the slope of the sigmoid", lo=0.0, lo_open=True)
    temperature: float = opt(0.0, "initial temperature of the tempered variant; 0 = plain top-k "
                                  "mixing, no temperature parameter", lo=0.0)
    lr: float = opt(1e-2, "learning rate of the omega parameters", lo=0.0)


@dataclass
class TrainConfig:
    steps: int = opt(1000, "optimizer steps", lo=1)
    batch_size: int = opt(32, "sequences per optimizer step, over all ranks", lo=1)
    micro_batch_size: int = opt(0, "sequences per forward on one rank; 0 = the whole per-rank batch "
                                   "(no gradient accumulation)", lo=0)
    lr: float = opt(3e-4, "peak learning rate of the backbone", lo=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay (backbone only)", lo=0.0)
    betas: list[float] = opt([0.9, 0.999], "AdamW betas")
    warmup: int = opt(2500, "linear warm-up steps", lo=0)
    schedule: str = opt("constant", "after warm-up: constant, or cosine down to 0",
                        choices=("constant", "cosine"))
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 = off", lo=0.0)
    ema: float = opt(0.9999, "EMA decay of the backbone weights; 0 = off", lo=0.0, hi=1.0)
    t_min: float = opt(1e-3, "lowest diffusion time sampled in training", lo=0.0, hi=1.0,
                       lo_open=True)
    t_max: float = opt(1.0, "highest diffusion time sampled in training", lo=0.0, hi=1.0,
                       lo_open=True)
    antithetic: bool = opt(True, "stratify the times of a batch (lower-variance ELBO estimate)")
    seed: int = opt(1, "seed of everything random in the run", lo=0)
    save_every: int = opt(1000, "write the run directory every this many steps", lo=1)
    eval_every: int = opt(500, "validation ELBO every this many steps", lo=1)
    eval_batches: int = opt(8, "micro-batches of validation data per evaluation", lo=1)
    log_every: int = opt(10, "metrics.jsonl line every this many steps", lo=1)
    max_forward_passes: int = opt(0, "stop once this many model forwards ran (iso-compute budget); "
                                     "0 = no limit", lo=0)
    precision: str = opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16",
                         choices=("auto", "fp32", "bf16"))
    grad_checkpointing: bool = opt(False, "recompute block activations in backward to save memory")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    strategy: str = opt("ddp", "several processes (torchrun): ddp = every rank holds the whole "
                               "model and optimizer; fsdp = FSDP2, each rank holds 1/N of the "
                               "weights, gradients and optimizer state (models too big for one "
                               "device)", choices=("ddp", "fsdp"))
    fsdp_offload: bool = opt(False, "with strategy fsdp: keep the sharded weights, gradients and "
                                    "optimizer state in CPU memory; the optimizer steps on the CPU")
    compile: bool = opt(False, "torch.compile every transformer block for training (needs a C "
                               "compiler; the first steps are slower while it compiles)")
    threads: int = opt(0, "CPU threads per process; 0 = the cores other work leaves free "
                          "(by the load average), shared by the ranks", lo=0)
    trackers: list[str] = opt(["jsonl"], "where rank 0 logs the metrics: jsonl (metrics.jsonl, "
                                         "always written), tensorboard, wandb (pip install "
                                         "smdlm[tracking]; WANDB_MODE=offline needs no network)",
                              choices=("jsonl", "tensorboard", "wandb"))


@dataclass
class FinetuneConfig:
    method: str = opt("dora", "adapter kind (peft): dora (the paper) or lora", choices=("dora", "lora"))
    r: int = opt(16, "adapter rank", lo=1)
    alpha: int = opt(16, "adapter scaling alpha", lo=1)
    dropout: float = opt(0.0, "adapter dropout", lo=0.0, hi=0.9)
    target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj"],
                               "module names that get adapters (the paper: attention only)")
    max_length: int = opt(2048, "drop examples longer than this many tokens", lo=8)
    min_response_tokens: int = opt(5, "drop examples with fewer response tokens", lo=1)
    pad_supervised: bool = opt(True, "padding (EOS) is part of the response: masked and learned, "
                                     "as the paper; false = pads never attended nor masked")
    pad_jitter: int = opt(50, "extra padding of 0..N-1 tokens per batch (then to a multiple of 8), "
                              "as the paper's collator", lo=0)
    mix: list[str] = opt([], "more SFT datasets mixed with data.source, each 'name' or "
                             "'name:subset' (read like data.source); the union is shuffled and cut "
                             "to data.max_docs")
    drop_token_ids: list[int] = opt([], "drop examples holding any of these token ids (the paper: "
                                        "151657, 151658, Qwen's tool-call tags)")
    official_grad_scaling: bool = opt(False, "sum the micro-batch losses instead of averaging "
                                             "them, as the official HF Trainer effectively did "
                                             "(its clip then bites accumulation-times earlier)")
    keep_best: bool = opt(False, "also keep the adapter and omega of the lowest validation loss "
                                 "in RUN/best/, a loadable run (the official load_best_model_at_end)")
    validation: str = opt("sm", "sm: every validation batch soft-masked (SM runs); official: a "
                                "seeded softmask.prob share of them, as the official trainer",
                          choices=("sm", "official"))


SECTIONS = {"model": ModelConfig, "data": DataConfig, "softmask": SoftMaskConfig,
            "train": TrainConfig, "finetune": FinetuneConfig}


@dataclass
class ReproduceConfig:
    """[reproduce] of DIR/reproduce.toml: how `smdlm reproduce DIR` evaluates the runs it trains."""
    runs: str = opt("runs/repro", "directory of the trained runs and every evaluation output")
    report: str = opt("docs/results.md", "the Markdown report; its figures go to figures/ beside it")
    samplers: list[str] = opt(["mdlm", "remdm-cap"], "samplers of the main sweep, one sweep each")
    num_samples: int = opt(32, "unconditional samples per cell (and MAUVE references)", lo=2)
    seeds: int = opt(3, "sampling seeds per cell: mean and standard error", lo=1)
    batch_size: int = opt(32, "rows decoded or scored together", lo=1)
    cache_block: int = opt(32, "block length of the SM x caching study", lo=1)
    threshold: float = opt(0.9, "confidence threshold of the SM x caching study's parallel rows",
                           lo=0.0, hi=1.0, lo_open=True)
    temperature: float = opt(1.0, "sampling temperature of the caching study (0 = argmax, which "
                                  "makes every unconditional sample the same)", lo=0.0)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")


@dataclass
class SudokuReproduceConfig:
    """[sudoku] of DIR/reproduce.toml: how `smdlm reproduce DIR` evaluates a Sudoku chain."""
    runs: str = opt("runs/sudoku", "directory of the trained runs and every evaluation output")
    report: str = opt("docs/results-sudoku.md", "the Markdown report (its JSON figures and plots "
                                                "go beside it)")
    samplers: list[str] = opt(["mdlm", "confidence"], "samplers of the table, one evaluation each")
    nfe: list[int] = opt([1, 2, 4, 8, 16, 32, 81], "denoising steps over the 81 cells")
    seeds: int = opt(3, "sampling seeds per cell: mean and standard error", lo=1)
    limit: int = opt(0, "test puzzles per cell; 0 = all of data.sudoku_test", lo=0)
    batch_size: int = opt(250, "puzzles decoded together", lo=1)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")


@dataclass
class Recipe:
    """A whole recipe: one dataclass per TOML table."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    softmask: SoftMaskConfig = field(default_factory=SoftMaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
