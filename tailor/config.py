"""Typed params: `params.yaml` loaded into pydantic models; every error names the key.

Layout of params.yaml: one section per stage (same name as its file, DVC stage and MLflow run), a
`devices` section of device profiles, a `schedule`, and `profiles` whose entries override stage values
(`quick` is what `make run` uses, `full` the real thing, `test` the CI end-to-end run). The active
profile is the top-level `profile` key.
"""
from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tailor.formats import backend
from tailor.quant.formats import FORMATS, Choice, block_of, choices, parse_choice, sort_choices, type_names

STAGES = ("calibrate", "supernet", "search", "finetune", "evaluate", "export", "register")
DEVICE_STAGES = ("search", "finetune", "evaluate", "export", "register")


class ConfigError(ValueError):
    """Bad params: the message is one line naming the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(Strict):
    source: str = Field("smollm2-135m", min_length=1, description=(
        "the base model: a built-in name (smollm2-135m, qwen2.5-coder-0.5b), a Hugging Face model directory "
        "or a GGUF file (tailor.models.source)"))
    n_layers: int | None = Field(None, gt=0, description="keep only the first N layers (tests)")


class CalibrateParams(Strict):
    corpora: list[Literal["boolq", "bold", "shakespeare"]] = ["boolq", "bold", "shakespeare"]
    seq_len: int = Field(256, gt=7, description="tokens per training sequence")
    train_seqs: int | None = Field(512, gt=0, description="training sequences, shared evenly by the corpora; null: "
                                   "every document each corpus has left after val and calib (uneven shares)")
    val_seqs: int = Field(64, gt=0)
    calib_seqs: int = Field(32, gt=0)
    min_chars: int = Field(20, ge=0, description="shorter documents are dropped")
    max_chars: int = Field(20000, gt=0, description="a longer document fails validation")
    max_duplicate_ratio: float = Field(0.2, ge=0, le=1, description="share of repeated docs that fails validation")
    ppl_docs: int = Field(200, gt=0, description="held-out wiki sentences for perplexity")
    piqa_docs: int = Field(300, gt=0)
    crows_docs: int = Field(400, gt=0, description="CrowS-Pairs pairs, stratified by bias type")
    seed: int = 0


Parallel = Literal["ddp", "fsdp"]
PARALLEL_DOC = ("under torchrun: ddp replicates the model on every GPU; fsdp shards weights, gradients and "
                "optimizer state (FSDP2) for models whose training state does not fit one GPU. Checkpoints are "
                "the same either way")
NPROC_DOC = ("training processes, one per GPU: > 1 makes the stage start itself under torchrun (NCCL on GPUs, "
             "gloo on CPU); rank 0 writes every output")


class SupernetParams(Strict):
    steps: int = Field(40, ge=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(2e-5, gt=0)
    n_random: int = Field(2, ge=0, description="random subnets per step besides max and min (sandwich rule)")
    kd_temperature: float = Field(1.0, gt=0)
    formats: dict[str, list[int | str]] | None = Field(
        None, description="export grids and the bit-widths or type names (GGUF: Q4_K, IQ4_NL ...) the supernet "
                          "trains; null = every device's format and allowed bits / types")
    min_ffn_frac: float = Field(0.25, gt=0, le=1)
    min_kv_groups: int = Field(1, gt=0)
    max_drop_frac: float = Field(0.25, ge=0, lt=1, description="most layers a subnet may drop")
    val_seqs: int = Field(16, gt=0, description="validation sequences for the min/mid/max loss report")
    device: str = "auto"
    seed: int = 0
    amp: bool = Field(True, description="bf16 autocast on CUDA (CPU always trains in float32)")
    compile: bool = Field(False, description="torch.compile the decoder blocks on CUDA")
    parallel: Parallel = Field("ddp", description=PARALLEL_DOC)
    nproc: int = Field(1, gt=0, description=NPROC_DOC)
    mode: Literal["end_to_end", "blockwise"] = Field(
        "end_to_end", description="end_to_end: the sandwich over whole subnets, KD on logits; blockwise: each "
                                  "block's choices against the teacher block's output from its input "
                                  "(tailor.elastic.blockwise), then `steps` end-to-end steps (0 = none)")
    block_steps: int = Field(100, gt=0, description="blockwise: optimizer steps per block (batch_size sequences each)")
    block_lr: float = Field(1e-4, gt=0, description="blockwise: lr of the block phase")
    kd_chunk: int = Field(0, ge=0, description="tokens per chunk of the chunked KD loss; 0 = the plain loss over "
                                               "whole-batch fp32 [tokens, vocab] logits")
    checkpointing: bool = Field(False, description="activation checkpointing of every decoder block (end to end)")

    @model_validator(mode="after")
    def _check_formats(self) -> "SupernetParams":
        for f, bits in (self.formats or {}).items():
            if f not in FORMATS:
                raise ValueError(f"formats.{f}: unknown format (known: {', '.join(FORMATS)})")
            bad = [b for b in bits if _choice_or_none(b) not in choices(f)]
            if bad:
                raise ValueError(f"formats.{f}: bits {bad} not available in {f} (has {list(choices(f))})")
        return self


def _choice_or_none(v: Choice) -> Choice | None:
    try:
        return parse_choice(v)
    except ValueError:
        return None


class FairnessParams(Strict):
    enabled: bool = Field(True, description="choose by KL + weight x worst-group stereotype rise (else KL only)")
    weight: float = Field(2.0, ge=0, description="KL nats per unit of worst-group share rise")
    per_group: int = Field(8, gt=0, description="CrowS-Pairs pairs per bias type scored per candidate")
    top_k: int = Field(8, gt=0, description="best-KL candidates whose bias is measured")


class SearchParams(Strict):
    n_candidates: int = Field(48, gt=1, description="NSGA-II trials (and random candidates for 'sampled')")
    val_seqs: int = Field(16, gt=0, description="validation sequences each candidate is scored on")
    score_batch: int = Field(8, gt=0, description="validation sequences a forward when scoring a candidate (GPU "
                                                  "memory: score_batch x seq_len x vocabulary fp32 logits; a "
                                                  "one-GPU search is bound by kernel launches, so fewer, larger "
                                                  "forwards score faster)")
    seed: int = 0
    strategies: list[Literal["mip", "nsga", "gumbel", "sampled"]] = Field(
        ["mip", "nsga", "gumbel"], min_length=1, description="run and compared at the same budget; the best wins")
    sens_seqs: int = Field(4, gt=0, description="validation sequences of the sensitivity table")
    sens_tokens: int = Field(64, gt=1, description="leading tokens of each of those sequences (the table costs "
                                                   "~800 forward passes per device: its ranking needs few tokens)")
    gumbel_steps: int = Field(40, ge=1)
    latency_configs: int = Field(8, ge=0, description="subnets exported and timed in the real runtime to calibrate "
                                                       "the latency model (0 = skip)")
    latency_threads: int = Field(4, gt=0, description="CPU threads the runtime times those subnets on: a fixed "
                                                      "count, so timings do not depend on this host's cores or on "
                                                      "the stages beside them, and the flow's early timing job and "
                                                      "the search agree on the cache entry")
    fairness: FairnessParams = FairnessParams()


class FinetuneParams(Strict):
    steps: int = Field(20, ge=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(1e-5, gt=0)
    schedule: Literal["constant", "cosine"] = Field("constant", description="lr over the steps: constant, or a "
                                                    "linear warm-up then cosine decay to 10% of lr")
    warmup_steps: int = Field(0, ge=0)
    train_embeddings: bool = Field(False, description="QAT also trains the tied embedding and its clip (frozen, "
                                                      "its fake quantization cached, by default)")
    kd_temperature: float = Field(1.0, gt=0)
    generated_seqs: int = Field(0, ge=0, description="sequences sampled from the base model (seq_len tokens each) "
                                                     "added to the training shard: distillation beyond the corpora")
    generate_batch: int = Field(64, gt=0, description="sequences sampled at once (memory: batch x seq_len KV cache)")
    device: str = "auto"
    seed: int = 0
    compile: bool = Field(False, description="torch.compile the quantizer, KD loss and block chains on CUDA")
    parallel: Parallel = Field("ddp", description=PARALLEL_DOC)
    nproc: int = Field(1, gt=0, description=NPROC_DOC)


class Gates(Strict):
    max_ppl_increase: float = Field(0.5, ge=0, description="relative perplexity increase allowed vs base")
    min_accuracy_retention: float = Field(0.9, ge=0, le=1,
                                          description="mean accuracy over the accuracy tasks kept, as a share of base")
    max_group_worsening: float = Field(0.10, ge=0, le=1,
                                       description="move of a bias group in its worse direction allowed (gated when its CI excludes 0)")
    min_group_n: int = Field(10, ge=1, description="bias groups with fewer paired items are listed as too small "
                                                   "to gate instead of passing or failing the group gate")


EVAL_TASKS = ("piqa", "boolq", "openbookqa", "commonsense_qa", "siqa", "mmlu", "crows", "bbq", "stereoset", "winogender")


class EvaluateParams(Strict):
    batch_size: int = Field(16, gt=0, description="rows per forward of lm-eval's HFLM (scorer: hflm)")
    scorer: Literal["batched", "hflm"] = Field(
        "batched", description="batched: tailor.eval.scorer (HFLM's numbers, no per-request Python); hflm: lm-eval's own")
    batch_tokens: int = Field(16384, gt=0, description="padded tokens per forward of the batched scorer")
    shards: int = Field(1, gt=0, description="processes that each load the model and score every shards-th item "
                        "(lm-eval's per-request Python on more cores; same scores to float rounding)")
    bootstrap: int = Field(1000, gt=0)
    seed: int = Field(0, description="bootstrap resamples and eval subsets")
    tasks: list[Literal[EVAL_TASKS]] = Field(  # type: ignore[valid-type]
        [t for t in EVAL_TASKS if t != "mmlu"], description="suites run besides held-out perplexity")
    limits: dict[str, int | None] = Field(
        {}, description="task -> items kept (per group for crows/bbq/stereoset/winogender; bbq groups are "
                        "category x context condition); absent or null = all")
    max_length: int | None = Field(None, gt=7, description="context window in tokens (left-truncated); null = model's")
    gates: Gates = Gates()

    @model_validator(mode="after")
    def _check(self) -> "EvaluateParams":
        bad = sorted(set(self.limits) - {"wiki", *EVAL_TASKS})
        if bad:
            raise ValueError(f"limits: unknown task(s) {bad} (known: wiki, {', '.join(EVAL_TASKS)})")
        neg = [k for k, v in self.limits.items() if v is not None and v <= 0]
        if neg:
            raise ValueError(f"limits: {neg[0]} must be positive or null, got {self.limits[neg[0]]}")
        return self


class ExportParams(Strict):
    ppl_docs: int = Field(100, gt=0, description="held-out sentences for runtime vs torch perplexity")
    prompt: str = "The capital of France is"
    gen_tokens: int = Field(16, gt=0)
    max_ppl_rel_diff: float = Field(0.02, gt=0)


class RegisterParams(Strict):
    model_prefix: str = "tailor-"
    alias: str = "candidate"


class DeviceProfile(Strict):
    runtime: str = Field(description="the runtime that loads the file (the format's backend names it)")
    format: str = Field(description="export format: a backend of tailor.formats (gguf, onnx)")
    budget_bytes: int | None = Field(None, description="absolute memory budget for weights")
    budget_fraction: float | None = Field(None, description="budget as a fraction of the base model's bf16 bytes")
    bandwidth_gbs: float = Field(gt=0, description="memory bandwidth, GB/s (spec sheet)")
    compute_tflops: float = Field(gt=0, description="peak compute, TFLOP/s (spec sheet)")
    allowed_bits: list[int] | None = Field(None, description="bit-widths each matrix may take (the format's "
                                                            "type of each width; GGUF 4 = Q4_0, 5 = Q5_1, 8 = Q8_0)")
    allowed_types: list[str] | None = Field(None, description="instead of allowed_bits: the format's type names "
                                            "(GGUF: Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_NL Q4_0 Q5_1 Q8_0 F16); a K-quant "
                                            "only where a matrix's input dimension is whole 256s")
    embed_bits: int = 8

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in FORMATS:
            raise ValueError(f"unknown format {v!r} (known: {', '.join(FORMATS)})")
        return v

    @model_validator(mode="after")
    def _check(self) -> "DeviceProfile":
        if (self.budget_bytes is None) == (self.budget_fraction is None):
            raise ValueError("set exactly one of budget_bytes, budget_fraction")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {self.budget_bytes}")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            raise ValueError(f"budget_fraction must be in (0, 1], got {self.budget_fraction}")
        expected = backend(self.format).runtime
        if self.runtime != expected:
            raise ValueError(f"format {self.format} runs in {expected}, not {self.runtime}")
        if (self.allowed_bits is None) == (self.allowed_types is None):
            raise ValueError("set exactly one of allowed_bits, allowed_types")
        if self.allowed_types is not None:
            names = type_names(self.format)
            bad_t = [t for t in self.allowed_types if t not in names]
            if bad_t:
                raise ValueError(f"allowed_types: {bad_t} not types of {self.format} "
                                 f"(has {', '.join(names) if names else 'none: name allowed_bits'})")
        bad = [b for b in [*(self.allowed_bits or []), self.embed_bits] if b not in FORMATS[self.format]]
        if bad:
            raise ValueError(f"bits {bad} not available in {self.format} (has {list(FORMATS[self.format])})")
        return self

    @property
    def choices(self) -> tuple[Choice, ...]:
        """What each matrix may take, fewest bits first: the allowed bit-widths, or the allowed types as
        choices (Q8_0 -> 8, Q4_K -> 'Q4_K'; tailor.quant.formats.parse_choice)."""
        if self.allowed_types is not None:
            names = type_names(self.format)
            return sort_choices(names[t] for t in self.allowed_types)
        return sort_choices(self.allowed_bits)

    def budget(self, base_bf16_bytes: int) -> int:
        return self.budget_bytes if self.budget_bytes is not None else int(self.budget_fraction * base_bf16_bytes)


class Schedule(Strict):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"


class RunnerParams(Strict):
    """Where per-device branches and search candidates run. `local` (threads in this process) is the
    default; `dask` fans out on a Dask cluster: a throwaway LocalCluster of `workers` processes, or the
    running scheduler at `address` (see docs/deploy.md)."""
    kind: Literal["local", "dask"] = Field("local", description="task runner: local threads or a Dask cluster")
    workers: int = Field(2, gt=0, description="Dask worker processes of a LocalCluster (one thread each)")
    address: str | None = Field(None, description="scheduler of a running Dask cluster, e.g. tcp://host:8786")
    base_eval: Literal["auto", "early", "in-stage"] = Field(
        "auto", description="early: the flow scores the base model's evaluate suite right after calibrate, beside "
        "supernet/search/finetune, and the evaluate stages read it from the cache; in-stage: the first evaluate "
        "stage scores it; auto: early on a CUDA machine (on a small CPU the two would compete for the cores)")

    @model_validator(mode="after")
    def _check(self) -> "RunnerParams":
        if self.address is not None and self.kind != "dask":
            raise ValueError(f"address is only used with kind 'dask', not {self.kind!r}")
        if self.address is not None and not self.address.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
            raise ValueError(f"address must be a scheduler URL like tcp://host:8786, got {self.address!r}")
        return self


warnings.filterwarnings("ignore", message='Field name "register"')  # a stage name, not BaseModel's


class Params(Strict):
    profile: str = "quick"
    profiles: dict[str, dict[str, Any]] = {}
    model: ModelParams = ModelParams()
    calibrate: CalibrateParams = CalibrateParams()
    supernet: SupernetParams = SupernetParams()
    search: SearchParams = SearchParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    register: RegisterParams = RegisterParams()
    devices: dict[str, DeviceProfile]
    schedule: Schedule = Schedule()
    runner: RunnerParams = RunnerParams()

    def supernet_formats(self) -> dict[str, list[Choice]]:
        """Grid -> choices (bit-widths, type names) the supernet trains: one supernet serves every device's
        format. Fewest bits first (plain bit-widths: ascending, as always)."""
        if self.supernet.formats is not None:
            return {f: list(sort_choices({parse_choice(x) for x in b} | {16})) for f, b in self.supernet.formats.items()}
        out: dict[str, set[Choice]] = {}
        for d in self.devices.values():
            out.setdefault(d.format, {16}).update(d.choices)
        return {f: list(sort_choices(b)) for f, b in sorted(out.items())}

    @model_validator(mode="after")
    def _gumbel_fits(self) -> "Params":
        if "gumbel" in self.search.strategies:
            for name, d in self.devices.items():
                wide = [c for c in d.choices if block_of(c) > 32]
                if wide:
                    raise ValueError(f"search.strategies: gumbel cannot search devices.{name}'s {wide} (256-element "
                                     "super-blocks fit only some matrices); use mip and nsga for it")
        return self

    def device(self, name: str) -> DeviceProfile:
        if name not in self.devices:
            raise ConfigError(f"devices: unknown device {name!r} (known: {', '.join(self.devices)})")
        return self.devices[name]


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        # A profile may set any field of an existing device (e.g. allowed_types instead of allowed_bits):
        # DeviceProfile names a field that does not exist. Elsewhere a key must exist in the base section.
        if k not in out and not re.fullmatch(r"profiles\.[^.]+\.devices\.[^.]+", where):
            raise ConfigError(f"{where}.{k}: unknown key (no such key in the base section)")
        out[k] = _merge(out[k], v, f"{where}.{k}") if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _one_line(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    if err["type"] not in ("extra_forbidden", "missing") and "input" in err and not isinstance(err["input"], dict):
        msg += f" (got {err['input']!r})"
    more = f" [+{len(e.errors()) - 1} more]" if len(e.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def parse_params(raw: dict[str, Any], profile: str | None = None, source: str = "params.yaml") -> Params:
    """Validate raw params and apply the active profile's overrides."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        Params.model_validate(raw)  # the file as written must be valid on its own
    except ValidationError as e:
        raise ConfigError(_one_line(e, source)) from None
    name = profile or raw.get("profile", "quick")
    profiles = raw.get("profiles", {})
    if name not in profiles:
        raise ConfigError(f"{source}: profile: unknown profile {name!r} (known: {', '.join(profiles)})")
    sections = {k: v for k, v in raw.items() if k not in ("profile", "profiles")}
    merged = _merge(sections, profiles[name] or {}, f"profiles.{name}")
    merged.update(profile=name, profiles=profiles)
    try:
        return Params.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_one_line(e, f"{source} (profile {name})")) from None


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key written twice in one mapping. PyYAML keeps the last value silently,
    DVC (ruamel) refuses the file: the two tools would read different params. The YAML spec requires
    unique keys, so this only turns an invalid file into an error naming the key path and both lines."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_unique(node, ())
        return super().construct_document(node)


def _check_unique(node: yaml.Node, path: tuple[str, ...]) -> None:
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique(item, path + (str(i),))
    elif isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue  # `<<:` merge keys may repeat
            line = key.start_mark.line + 1
            if key.value in seen:
                raise yaml.MarkedYAMLError(problem=f"{'.'.join(path + (key.value,))}: key written twice "
                                                   f"(lines {seen[key.value]} and {line})",
                                           problem_mark=key.start_mark)
            seen[key.value] = line
            _check_unique(value, path + (key.value,))


def read_yaml(path: str | Path) -> Any:
    """A YAML file through UniqueKeyLoader; ConfigError (one line naming the file) when absent or invalid."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except yaml.MarkedYAMLError as e:
        if e.problem and "key written twice" in e.problem:
            raise ConfigError(f"{path}: {e.problem}") from None
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_params(path: str | Path = "params.yaml", profile: str | None = None) -> Params:
    path = Path(path)
    return parse_params(read_yaml(path), profile, str(path))


def pick_devices(params: Params, devices: str | list[str] | None) -> list[str]:
    """Comma list or list of device names -> validated list (all devices when None)."""
    if devices is None or devices == "":
        return list(params.devices)
    names = devices.split(",") if isinstance(devices, str) else list(devices)
    for n in names:
        params.device(n.strip())
    return [n.strip() for n in names]
