"""Command-line settings shared by every ``evaluation.inference_*`` command.

Policy: argparse lives only here, at the edge. Every flag is a field of a frozen dataclass
(:class:`EvalConfig` for the shared settings, a method's own params dataclass for its flags),
declared with :func:`option`; the parser is generated from those fields and the parsed values
go straight back into the dataclasses, whose ``__post_init__`` validates them. Each flag is
accepted with hyphens and with underscores (``--max-new-tokens`` and ``--max_new_tokens``).
Any error, argparse's own or a validation error, is one line on stderr
(``<prog>: error: ...``) and exit code 2.

Settings left unset resolve against the machine and the other flags:

- device: ``cuda`` when available, else ``cpu``;
- dtype: the checkpoint's own (``torch_dtype`` in its ``config.json``); for the embedded
  default model, GGUF files and configs that name none, ``bfloat16`` on cuda and ``float32``
  on cpu;
- model id: ``<model-name>-<method>-<dtype>-temp-<temperature>``;
- question file: ``data/<bench>/question.jsonl`` of this repository;
- answer file: ``model_answer/<model-id>.jsonl`` beside the question file;
- workers: none, this process answers everything. ``--num-workers N`` (cpu) or
  ``--num-gpus-total N --num-gpus-per-model M`` (cuda, FastChat's semantics: N / M workers
  of M GPUs each, the model on the first) shard the questions over Ray workers
  (:mod:`evaluation.sharding`); Ray is then needed, and checked for here.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

import torch

from logitspec.cost import parse_float32_from
from logitspec.decoding import GenerationConfig
from logitspec.loading import DEFAULT_MODEL, DEFAULT_MODEL_NAMES, DTYPES, checkpoint_dtype

if TYPE_CHECKING:
    from .methods import Method

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"


def option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a command-line flag (``help``, ``type``, ``choices``...)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``<prog>: error: <message>``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class EvalConfig:
    """The settings every inference command shares (one field per flag)."""

    model_path: str | None = option(
        None, "an HF checkpoint folder (safetensors), a .gguf file, or "
        f"{DEFAULT_MODEL} (the embedded default model, used when omitted)")
    model_id: str | None = option(
        None, "name of the run (default: <model-name>-<method>-<dtype>-temp-<temperature>)")
    bench_name: str = option("demo", "reads data/<bench-name>/question.jsonl")
    question_file: str | None = option(None, "a question file to read instead of the bench's")
    question_begin: int | None = option(
        None, "first question (0-based index in file order)", type=int)
    question_end: int | None = option(
        None, "end of the slice (exclusive index in file order)", type=int)
    questions_per_category: int | None = option(
        None, "keep the first N questions of each category, after --question-begin/end "
        "(the eight MT-bench categories count as one)", type=int)
    answer_file: str | None = option(
        None, "where answers go (default: model_answer/<model-id>.jsonl beside the question file)")
    max_new_tokens: int = option(256, "most tokens generated per turn", type=int)
    temperature: float = option(0.0, "0 is greedy decoding; > 0 samples", type=float)
    top_p: float = option(1.0, "nucleus sampling mass (1.0: off)", type=float)
    top_k: int = option(0, "sample among the k most likely tokens (0: off)", type=int)
    seed: int = option(0, "sampling seed; choice i uses seed + i", type=int)
    num_choices: int = option(1, "answers generated per question", type=int)
    dtype: str | None = option(
        None, "weights and activations (default: the checkpoint's torch_dtype; for the "
        "embedded model, GGUF files and configs without one: bfloat16 on cuda, float32 on cpu)",
        choices=tuple(DTYPES))
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda when available)")
    float32_from: str = option(
        "auto", "passes of at least N tokens (prefill, large trees) run their matmuls in "
        "float32 against a float32 copy of half-precision weights: N, 'off', or 'auto' "
        "(measured once per machine; only a CPU without half-precision matrix instructions "
        "gains)")
    template: str | None = option(
        None, "a FastChat conversation template such as vicuna_v1.1 or llama-2 (default: the "
        "tokenizer's chat template, else FastChat's template for the model name)")
    num_gpus_per_model: int = option(
        1, "GPUs reserved for each worker (the model runs on the first)", type=int)
    num_gpus_total: int = option(
        1, "GPUs in all; total / per model workers, sharded with Ray when more than one",
        type=int)
    num_workers: int | None = option(
        None, "cpu: answer with N Ray workers, each loading the model once (default: this "
        "process answers everything)", type=int)
    ray_address: str | None = option(
        None, "run the workers on this Ray cluster ('auto': the one `ray start` made; "
        "default: a local Ray started for the run)")
    max_retries: int = option(
        2, "times a question is retried after its worker died, before an error entry",
        type=int)
    warmup: int = option(
        1, "untimed warm-up generations before the first answer (per worker)", type=int)
    prefix_cache: int = option(
        0, "1: a question starts from the previous one's cache and prefills only what follows "
        "the prefix its prompt shares with the previous conversation (questions about one "
        "document); 0: every question is prefilled whole (Spec-Bench's protocol)", type=int,
        choices=[0, 1])

    def __post_init__(self) -> None:
        self.generation_config()  # validates max_new_tokens and the sampling fields
        for name in ("question_begin", "question_end"):
            _positive(name, getattr(self, name), 0)
        if None not in (self.question_begin, self.question_end):
            if self.question_end < self.question_begin:
                raise ValueError("question_end must be >= question_begin")
        _positive("questions_per_category", self.questions_per_category)
        _positive("num_choices", self.num_choices)
        _positive("warmup", self.warmup, 0)
        if isinstance(self.resolved_float32_from, int) and self.resolved_dtype == "float32":
            raise ValueError("--float32-from widens half-precision passes; the dtype is float32 "
                             "(use --float32-from off or a half-precision --dtype)")
        self._check_device()
        self._check_workers()
        self._check_template()

    def _check_workers(self) -> None:
        _positive("num_gpus_per_model", self.num_gpus_per_model)
        _positive("num_gpus_total", self.num_gpus_total)
        _positive("num_workers", self.num_workers)
        _positive("max_retries", self.max_retries, 0)
        if self.ray_address is not None and not self.ray_address.strip():
            raise ValueError("ray_address must not be empty")
        per_model, total = self.num_gpus_per_model, self.num_gpus_total
        if per_model > total:
            raise ValueError(
                f"num_gpus_per_model ({per_model}) must be <= num_gpus_total ({total})")
        if total % per_model:
            raise ValueError(
                f"num_gpus_total ({total}) must be a multiple of num_gpus_per_model ({per_model})")
        on_cuda = self.resolved_device.startswith("cuda")
        if total > 1 and not on_cuda:
            raise ValueError("--num-gpus-total and --num-gpus-per-model shard a cuda run, but the "
                             "device is cpu: use --num-workers")
        if self.num_workers is not None and on_cuda:
            raise ValueError("--num-workers shards a cpu run (pass --device cpu): on cuda, "
                             "workers are --num-gpus-total / --num-gpus-per-model")
        flag = self.sharding_flag
        if flag and self.device is not None and torch.device(self.device).index is not None:
            raise ValueError(f"device {self.device!r} names one GPU, but Ray gives each worker "
                             "its own: pass --device cuda")
        if flag and importlib.util.find_spec("ray") is None:
            raise ValueError(f"{flag} needs Ray: pip install 'logitspec[ray]'")

    def _check_device(self) -> None:
        if self.device is None:
            return
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"unknown device {self.device!r}") from None
        if device.type != "cuda" or self.ray_address is not None:  # a cluster has its own GPUs
            return
        if not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"device {self.device!r}: this machine has {torch.cuda.device_count()} GPU(s)"
            )

    @property
    def worker_count(self) -> int:
        """Workers answering questions: ``--num-workers``, else GPUs total / per model."""
        if self.num_workers is not None:
            return self.num_workers
        return self.num_gpus_total // self.num_gpus_per_model

    @property
    def sharding_flag(self) -> str | None:
        """The flag that asks for Ray workers (None: this process answers everything).

        Policy: ``--num-workers`` (even 1) and ``--ray-address`` always mean Ray workers;
        the GPU flags do when they make more than one worker.
        """
        if self.num_workers is not None:
            return f"--num-workers {self.num_workers}"
        if self.ray_address is not None:
            return "--ray-address"
        if self.worker_count > 1:
            return f"--num-gpus-total {self.num_gpus_total}"
        return None

    def _check_template(self) -> None:
        if self.template is None:
            return
        from fastchat.conversation import conv_templates

        if self.template not in conv_templates:
            raise ValueError(
                f"unknown template {self.template!r} (names: fastchat.conversation.conv_templates,"
                " e.g. vicuna_v1.1, llama-2, chatml)"
            )

    @property
    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def resolved_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        own = checkpoint_dtype(self.model_path)
        if own is not None:
            return own
        return "bfloat16" if self.resolved_device.startswith("cuda") else "float32"

    @property
    def resolved_float32_from(self) -> str | int | None:
        """``"auto"``, None (off) or a pass size (see :func:`logitspec.cost.float32_from_for`)."""
        return parse_float32_from(self.float32_from)

    @property
    def is_default_model(self) -> bool:
        return self.model_path is None or self.model_path in DEFAULT_MODEL_NAMES

    @property
    def model_name(self) -> str:
        """The embedded default's name, a GGUF file's stem, else the folder's name."""
        if self.is_default_model:
            return DEFAULT_MODEL
        path = Path(os.path.expanduser(self.model_path)).resolve()
        return path.stem if path.suffix == ".gguf" else path.name

    @property
    def model_location(self) -> str:
        """The model as recorded in answer files: the default's name or an absolute path."""
        if self.is_default_model:
            return DEFAULT_MODEL
        return str(Path(os.path.expanduser(self.model_path)).resolve())

    @property
    def question_path(self) -> Path:
        if self.question_file is not None:
            return Path(self.question_file)
        return DATA_DIR / self.bench_name / "question.jsonl"

    def generation_config(self, eos_token_ids: Sequence[int] = ()) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            eos_token_ids=tuple(eos_token_ids),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
        )


@dataclass(frozen=True)
class RunConfig:
    """A parsed command line: the shared settings, the method and the method's params."""

    settings: EvalConfig
    method: "Method"
    params: Any

    @property
    def model_id(self) -> str:
        if self.settings.model_id:
            return self.settings.model_id
        e = self.settings
        return f"{e.model_name}-{self.method.name}-{e.resolved_dtype}-temp-{float(e.temperature)}"

    @property
    def answer_path(self) -> Path:
        if self.settings.answer_file is not None:
            return Path(self.settings.answer_file)
        return self.settings.question_path.parent / "model_answer" / f"{self.model_id}.jsonl"


def add_options(parser: argparse._ActionsContainer, cls: type, *, underscores_first: bool) -> None:
    """Adds one flag per field of ``cls``; the other spelling is accepted but not listed."""
    for f in fields(cls):
        hyphens, underscores = "--" + f.name.replace("_", "-"), "--" + f.name
        shown, hidden = (underscores, hyphens) if underscores_first else (hyphens, underscores)
        kwargs = dict(f.metadata)
        help_text = kwargs.pop("help")
        default = None if f.default is MISSING else f.default
        if default is not None:
            help_text += " (default: %(default)s)"
        parser.add_argument(shown, dest=f.name, default=default, help=help_text, **kwargs)
        if hidden != shown:
            parser.add_argument(hidden, dest=f.name, default=default, help=argparse.SUPPRESS,
                                **kwargs)


def build_parser(method: "Method") -> OneLineParser:
    parser = OneLineParser(
        prog=method.prog, description=method.description,
        epilog="Every flag is also accepted with underscores for hyphens, or the other way round.",
    )
    add_options(parser, EvalConfig, underscores_first=False)
    if fields(method.params_type):
        group = parser.add_argument_group(f"{method.name} options")
        add_options(group, method.params_type, underscores_first=True)
    return parser


def _from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)})


def parse_args(method: "Method", argv: Sequence[str] | None = None) -> RunConfig:
    """The command line as a :class:`RunConfig`; exits 2 with one line on any error."""
    parser = build_parser(method)
    namespace = parser.parse_args(argv)
    try:
        return RunConfig(
            _from_namespace(EvalConfig, namespace),
            method,
            _from_namespace(method.params_type, namespace),
        )
    except (ValueError, NotImplementedError) as exc:
        parser.error(str(exc))
