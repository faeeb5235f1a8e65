"""The labeling job spec: frozen dataclasses loaded from YAML and validated at load.

Example (``manifests/jobs/tiny-cpu.yaml`` is a complete one)::

    teacher: {model: /models/teacher, dtype: float32, engine_args: {enforce_eager: true}}
    corpus: {sources: ["data/*.jsonl"], text_field: text}
    packing: {seq_len: 1024}
    labels: {k: 64}
    output: {url: s3://bucket/labels/run-1}
    cluster: {replicas: 8}          # only for `labelgen run-ray` / `labelgen submit`

Every field is documented right under it; ``labelgen validate SPEC`` checks a spec
without loading a model.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from labelgen.contract.codecs import CODEC_NAMES, DEFAULT_CODEC
from labelgen.contract.config_input import MAX_CONFIG_BYTES, kind, read_yaml, show
from labelgen.contract.configs import ConfigError, config_to_dict, load_config, load_config_file
from labelgen.credentials import find_secrets, url_problem

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")
"""The default of ``corpus.chat_roles``: the roles the usual chat templates know."""

__all__ = [
    "CHAT_ROLES",
    "TeacherSpec",
    "CorpusSpec",
    "PackingSpec",
    "LabelsSpec",
    "HiddenSpec",
    "OutputSpec",
    "ClusterSpec",
    "ReferenceCheckSpec",
    "ChecksSpec",
    "GenerateSpec",
    "JobSpec",
    "load_spec",
    "load_spec_text",
]


@dataclass(frozen=True)
class TeacherSpec:
    model: str
    """Local directory of a Hugging Face checkpoint (config.json + weights), or a model id
    already in the local HF cache."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to ``model``."""
    revision: str | None = None
    """Model revision recorded in the manifest (and passed to vLLM)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype of the teacher. Labels are always stored as float32."""
    max_model_len: int | None = None
    """Longest sequence the engine accepts; must be >= packing.seq_len. None: the model's."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``vllm.LLM``, passed through untouched
    (e.g. tensor_parallel_size, gpu_memory_utilization, enforce_eager)."""
    batch_sequences: int = 256
    """Sequences handed to the engine per call; the engine schedules them with
    continuous batching. Also the granularity of shard rotation and resume."""
    weights_hash: Literal["sampled", "full", "none"] = "sampled"
    """How the manifest fingerprints the weight files: 'sampled' hashes each file's
    name, size and first/last MiB (fast on 100 GB checkpoints); 'full' hashes every byte."""

    def check(self):
        if self.batch_sequences < 1:
            yield "batch_sequences", f"must be >= 1, got {self.batch_sequences}"
        if self.max_model_len is not None and self.max_model_len < 2:
            yield "max_model_len", f"must be >= 2, got {self.max_model_len}"
        reserved = {"model", "tokenizer", "dtype", "max_model_len", "revision", "max_logprobs"}
        for key in sorted(reserved & set(self.engine_args)):
            yield f"engine_args.{key}", "is set by the spec itself; use teacher.* or labels.k instead"


@dataclass(frozen=True)
class CorpusSpec:
    sources: list[str]
    """URLs or globs (any fsspec protocol) of .jsonl / .parquet / text files, or saved
    Hugging Face ``datasets`` directories. Expanded and sorted; each file is one work unit,
    or several when it is larger than ``unit_mib``."""
    format: Literal["auto", "jsonl", "parquet", "text", "hf"] = "auto"
    """Input format; 'auto' decides by file extension (.jsonl/.json[.gz|.zst], .parquet,
    .txt/.md, or a directory holding dataset_info.json)."""
    text_field: str = "text"
    """Field (column) holding the document text in jsonl / parquet / hf inputs."""
    messages_field: str | None = None
    """Field holding chat messages ([{role, content}, ...]). When set and present in a
    record, the record is rendered with the tokenizer's chat template and only assistant
    tokens are training targets; records without it fall back to text_field."""
    text_split: Literal["file", "paragraph", "line"] = "paragraph"
    """For plain-text inputs: one record per file, per blank-line paragraph, or per line."""
    max_record_chars: int = 1_000_000
    """Records longer than this are rejected (counted as 'too_long' in the manifest); a
    jsonl line is read in bounded memory (at most ~6 bytes per allowed character)."""
    max_messages: int = 256
    """Chats with more messages than this are rejected ('too_many_messages'): masking
    renders a chat once per assistant turn, so a huge message list costs quadratic time."""
    chat_roles: tuple[str, ...] = CHAT_ROLES
    """Roles a chat message may have; others are rejected ('unknown_role'). The default:
    system, developer, user, assistant, tool, ipython, function."""
    on_bad_source: Literal["error", "skip"] = "error"
    """What to do with a source that cannot be read when the job is planned (a broken
    Parquet footer, a corrupt compressed stream, a damaged saved dataset): 'error' fails
    the job before the model loads, naming every bad source; 'skip' leaves them out and
    lists them, with the reason, under ``corpus.skipped_sources`` in the manifest."""
    unit_mib: float = 256.0
    """Target size of a work unit (MiB of input). Larger files are split into units of
    about this size so replicas share them: Parquet by row groups, jsonl and text by
    byte ranges aligned to record boundaries, saved datasets by their Arrow files.
    Compressed streams (.gz, .zst, .bz2, .xz, ...) and ``text_split: file`` inputs
    cannot be split and stay one unit each. Part of the spec hash (except at its
    default): the plan is recorded in the output and a resume must find the same one."""

    def check(self):
        if self.unit_mib <= 0:
            yield "unit_mib", f"must be > 0, got {self.unit_mib}"
        if not self.sources:
            yield "sources", "must list at least one URL or glob"
        if self.max_record_chars < 1:
            yield "max_record_chars", f"must be >= 1, got {self.max_record_chars}"
        if self.max_messages < 1:
            yield "max_messages", f"must be >= 1, got {self.max_messages}"
        for i, url in enumerate(self.sources):
            if problem := url_problem(url):
                yield f"sources[{i}]", problem


@dataclass(frozen=True)
class PackingSpec:
    seq_len: int = 2048
    """Tokens per sequence. Longer documents are split into chunks."""
    cross_documents: bool = True
    """Pack documents back to back into full sequences (True) or give every document
    its own sequence(s) of at most seq_len tokens (False)."""
    separator: Literal["eos", "bos", "none"] = "eos"
    """Token appended after every document."""
    min_tokens: int = 2
    """Sequences shorter than this are dropped (counted as 'too_short')."""

    def check(self):
        if self.seq_len < 2:
            yield "seq_len", f"must be >= 2, got {self.seq_len}"
        if not 2 <= self.min_tokens <= max(self.seq_len, 2):
            yield "min_tokens", f"must be between 2 and seq_len, got {self.min_tokens}"


@dataclass(frozen=True)
class LabelsSpec:
    k: int = 64
    """Top-k log-probs stored per position (plus the real next token's log-prob)."""
    extraction: Literal["auto", "hook", "public"] = "auto"
    """How labels leave vLLM: 'hook' computes them inside vLLM's worker (one pass, no
    per-position Python objects; needed for draws and hidden states); 'public' uses
    vLLM's flat prompt-logprobs output; 'auto' tries the hook and falls back with a
    message where it cannot run."""
    draws: int = 0
    """Random-sampling KD labels: draws per position from the teacher's full
    distribution, stored as unique ids + counts (0 = off; at most 255)."""
    draw_temperature: float = 1.0
    """Temperature of the distribution the draws come from."""
    seed: int = 0
    """Seed of the draws and of the hidden-state positions."""
    codec: Literal[CODEC_NAMES] = DEFAULT_CODEC  # type: ignore[valid-type]
    """Top-k storage: one of the registered codecs (``labelgen/contract/codecs/``, one
    module each; byte layouts and measured sizes in docs/FORMAT.md). 'plain' stores
    int32 ids + float32 log-probs exactly; the compact codecs trade a bounded KL (mean
    <= 1e-3 nats per position) for 25-50% of plain's bytes. The student reader decodes
    every codec transparently; the target log-prob stays float32."""
    logits_budget_mib: float = 1024.0
    """Working memory (MiB) the on-device label computation may add per worker on top of
    what vLLM profiled: logits, top-k, log-sum-exp, draws and targets are computed in row
    chunks whose temporaries stay within it (at least one row; 882 rows at a 152k
    vocabulary by default). vLLM's ``gpu_memory_utilization`` does not count it, so leave
    at least this much device memory free (docs/SCALE.md, section 4). It does not change
    the labels, so it is not part of the spec hash: a job may resume with another budget."""

    def check(self):
        if self.logits_budget_mib <= 0:
            yield "logits_budget_mib", f"must be > 0, got {self.logits_budget_mib}"
        if self.k < 1:
            yield "k", f"must be >= 1, got {self.k}"
        if not 0 <= self.draws <= 255:
            yield "draws", f"must be in 0..255, got {self.draws}"
        if self.draw_temperature <= 0:
            yield "draw_temperature", f"must be > 0, got {self.draw_temperature}"
        if self.draws and self.extraction == "public":
            yield (
                "extraction",
                "must be 'hook' or 'auto' when labels.draws > 0 (the public path has no draws)",
            )


@dataclass(frozen=True)
class HiddenSpec:
    layers: list[int] = field(default_factory=list)
    """Hidden-state layers to sample (HF numbering: 0 = embeddings, i = output of decoder
    layer i; the last one is after the final norm, as in transformers). Empty = off.
    On a compiled engine (the default) they come from the model's auxiliary hidden-state
    outputs, which vLLM's EAGLE-3 capable models have (Llama, Qwen2 and others); for
    other models the hook refuses to install once the engine has started (after its
    compile): set ``teacher.engine_args.enforce_eager: true`` for those (forward hooks,
    no compiled graphs)."""
    every: int = 16
    """One sampled position every this many tokens (seeded phase per sequence)."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of the hidden-state vectors."""

    def check(self):
        if self.every < 1:
            yield "every", f"must be >= 1, got {self.every}"
        for i, layer in enumerate(self.layers):
            if layer < 0:
                yield f"layers[{i}]", f"must be >= 0, got {layer}"


@dataclass(frozen=True)
class OutputSpec:
    url: str
    """Dataset root: a local path or any fsspec URL (s3://bucket/prefix, gs://...)."""
    shard_mib: float = 512.0
    """Target shard size; a shard is closed once it reaches this size."""
    row_group_mib: float = 64.0
    """Target uncompressed size of a Parquet row group (the student's unit of streaming)."""
    compression_level: int = 3
    """zstd level for every column."""
    overwrite: bool = False
    """Delete an existing dataset at url that a different spec produced."""

    def check(self):
        if self.shard_mib <= 0:
            yield "shard_mib", f"must be > 0, got {self.shard_mib}"
        if self.row_group_mib <= 0:
            yield "row_group_mib", f"must be > 0, got {self.row_group_mib}"
        if not 1 <= self.compression_level <= 22:
            yield "compression_level", f"must be in 1..22, got {self.compression_level}"
        if problem := url_problem(self.url):
            yield "url", problem
        elif self.url.startswith(("http://", "https://")):
            yield "url", f"{self.url!r} is read-only over HTTP; write labels to a local path, s3:// or gs://"


@dataclass(frozen=True)
class ClusterSpec:
    """How ``labelgen run-ray`` / ``labelgen submit`` spread the job over a Ray cluster.

    Ignored by the local ``labelgen run``, and not part of the spec hash: the same job
    may be resumed with more or fewer replicas, locally or on a cluster.
    """

    replicas: int = 1
    """Data-parallel teacher replicas: Ray actors, each owning one vLLM engine and
    labeling whole work units (sources, or parts of them) at a time."""
    gpus_per_replica: float | None = None
    """GPUs each replica reserves. None: teacher.engine_args tensor_parallel_size x
    pipeline_parallel_size when the cluster has GPUs, 0 when it has none (CPU vLLM)."""
    cpus_per_replica: float = 1.0
    """CPUs each replica reserves. Besides the engine's own thread, a replica runs two host
    threads that overlap with it (reading + tokenizing + packing the next batch; encoding
    + writing the last one): reserve 3 on GPU nodes so neither waits for a core."""
    resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources per replica, e.g. {"accelerator_type:H100": 0.001}."""
    env_vars: dict[str, str] = field(default_factory=dict)
    """Environment of the replicas (e.g. VLLM_CPU_KVCACHE_SPACE, HF_HOME). Never
    credentials: those come from the nodes' own environment or instance roles."""
    max_unit_attempts: int = 3
    """Tries per work unit when the replica running it dies (preemption, OOM, kill);
    a retried unit resumes after its committed shards, so nothing is lost or doubled."""
    progress_every_s: float = 30.0
    """Seconds between progress lines in the driver log and rewrites of
    <output.url>/_progress.json (read by `labelgen status`)."""

    def check(self):
        if self.replicas < 1:
            yield "replicas", f"must be >= 1, got {self.replicas}"
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            yield "gpus_per_replica", f"must be >= 0 (or null for automatic), got {self.gpus_per_replica}"
        if self.cpus_per_replica < 0:
            yield "cpus_per_replica", f"must be >= 0, got {self.cpus_per_replica}"
        for name, amount in self.resources.items():
            if amount <= 0:
                yield f"resources.{name}", f"must be > 0, got {amount}"
        if self.max_unit_attempts < 1:
            yield "max_unit_attempts", f"must be >= 1, got {self.max_unit_attempts}"
        if self.progress_every_s <= 0:
            yield "progress_every_s", f"must be > 0, got {self.progress_every_s}"


@dataclass(frozen=True)
class ReferenceCheckSpec:
    """Reference match: the response's final answer must equal the record's reference."""

    field: str = "answer"
    """Record field (column) holding the reference answer (a string or a number)."""
    extract: Literal["boxed", "last_number", "regex"] = "boxed"
    """How the final answer is taken from the response: 'boxed' = the content of the last
    ``\\boxed{...}`` (nested braces allowed); 'last_number' = the last number in the text
    (commas between digit groups allowed); 'regex' = group 1 (else the whole match) of
    the last match of ``pattern``."""
    pattern: str | None = None
    """Regular expression for ``extract: regex`` (Python syntax, searched in the response)."""
    reference_extract: Literal["as_is", "boxed", "last_number", "regex"] = "as_is"
    """How the answer is taken from the reference field: 'as_is' uses the whole field
    (stripped); the others as in ``extract`` (a reference that is a worked solution)."""
    rel_tol: float = 1e-6
    """Answers that both parse as numbers (int, decimal, fraction a/b, percent, scientific)
    match when they are within this relative tolerance..."""
    abs_tol: float = 1e-9
    """...or within this absolute one. Answers that do not both parse as numbers match
    when equal after normalisation (whitespace, case, surrounding $ or \\( \\), a final
    period, \\text{...} wrappers); ``\\frac{a}{b}`` and a leading currency $ parse as numbers."""

    def check(self):
        if not self.field:
            yield "field", "must name the record field holding the reference answer"
        if (self.extract == "regex" or self.reference_extract == "regex") and not self.pattern:
            yield "pattern", "must be set when extract or reference_extract is 'regex'"
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                yield "pattern", f"is not a valid regular expression ({exc})"
        for name in ("rel_tol", "abs_tol"):
            if getattr(self, name) < 0:
                yield name, f"must be >= 0, got {getattr(self, name)}"


@dataclass(frozen=True)
class ChecksSpec:
    """Verification of each generated sample (rejection sampling). A sample is kept only if
    it passes every check that is on; the first failing check is its rejection reason."""

    finished: bool = True
    """Reject responses cut at ``generate.max_tokens`` (finish reason 'length')."""
    min_tokens: int = 1
    """Reject responses of fewer tokens than this."""
    max_tokens: int | None = None
    """Reject responses of more tokens than this (None: no bound besides generate.max_tokens)."""
    format: str | None = None
    """A regular expression the whole response must match (``re.fullmatch``, DOTALL), e.g.
    ``'<think>.+</think>.*\\\\boxed\\{.+\\}.*'``; None: off."""
    reference: ReferenceCheckSpec | None = None
    """Compare the response's final answer with the record's reference (None: off)."""
    user: str | None = None
    """A check of your own, ``package.module:function``, called with a
    :class:`labelgen.checks.Sample`; returns a bool, or ``(bool, reason)`` (docs/GENERATE.md)."""
    dedup: Literal["none", "exact", "near"] = "exact"
    """Drop a passing sample whose response repeats an earlier passing sample of the same
    prompt: 'exact' after whitespace normalisation, 'near' when the word-3-gram Jaccard
    similarity is at least ``near_threshold``."""
    near_threshold: float = 0.9
    """Similarity at or above which ``dedup: near`` calls two responses duplicates."""

    def check(self):
        if self.min_tokens < 0:
            yield "min_tokens", f"must be >= 0, got {self.min_tokens}"
        if self.max_tokens is not None and self.max_tokens < max(self.min_tokens, 1):
            yield "max_tokens", f"must be >= min_tokens and >= 1, got {self.max_tokens}"
        if self.format is not None:
            try:
                re.compile(self.format)
            except re.error as exc:
                yield "format", f"is not a valid regular expression ({exc})"
        if self.user is not None and not _IMPORT_PATH.fullmatch(self.user):
            yield "user", f"must look like package.module:function, got {self.user!r}"
        if not 0.0 < self.near_threshold <= 1.0:
            yield "near_threshold", f"must be in (0, 1], got {self.near_threshold}"


_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass(frozen=True)
class GenerateSpec:
    """Sequence-level distillation (``labelgen generate``): the teacher writes responses to
    the corpus's prompts; they are checked, kept by a policy, stored as a chat SFT dataset,
    and (``labels: true``) labeled with the teacher's top-k like any labeling job."""

    prompt_field: str = "prompt"
    """Record field holding a text prompt. Used when the record has no
    ``corpus.messages_field`` value (messages: the chat up to its last user turn; trailing
    assistant turns are dropped) and no ``prompt_ids_field`` value."""
    prompt_ids_field: str | None = None
    """Record field holding a prompt already tokenized (a list of token ids), sent as is."""
    system_prompt: str | None = None
    """A system message put before text prompts and chats that have none."""
    chat_template: bool = True
    """Render prompts with the tokenizer's chat template (a text prompt becomes one user
    message) and the generation prompt; false: the prompt text is tokenized as it is."""
    n: int = 4
    """Samples per prompt."""
    temperature: float = 0.6
    """Sampling temperature (0: greedy; then n must be 1)."""
    top_p: float = 0.95
    """Nucleus sampling threshold (1: off)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: off)."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one (0: off)."""
    max_tokens: int = 1024
    """Most tokens generated per sample; prompt + response must fit teacher.max_model_len."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a response (not included in it)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a response (besides the tokenizer's EOS)."""
    seed: int = 0
    """Base seed: sample i of prompt p is drawn with a seed derived from (seed, p's id, i),
    so a re-run (or a retried unit) asks the engine the same questions the same way."""
    checks: ChecksSpec = field(default_factory=ChecksSpec)
    """What a sample must pass to be kept."""
    keep: Literal["all", "best_of_n", "first"] = "all"
    """Which passing samples of a prompt are kept: every one, the one with the best
    ``score``, or the first by sample index."""
    score: str = "mean_logprob"
    """The score of ``keep: best_of_n``: 'mean_logprob' (the teacher's mean log-prob of the
    response tokens) or ``package.module:function`` returning a float for a
    :class:`labelgen.checks.Sample` (higher is better; ties go to the lower sample index)."""
    mean_logprob: bool = True
    """Store each sample's mean teacher log-prob. With ``labels`` it comes free from a kept
    sample's labels; without labels (or for ``keep: best_of_n`` by mean_logprob) it needs
    the sampled tokens' log-probs at generation time, which cost vLLM's front end extra
    work per token (docs/GENERATE.md measures it): false leaves it null there."""
    labels: bool = True
    """Also store teacher labels (top-k per ``labels``, plus draws and hidden states when
    on) for every kept sample's response tokens, prompt masked, in the ordinary label
    format under output.url, so ``students train`` reads them unchanged."""
    keep_rejected: bool = False
    """Also store the rejected samples (with their reasons) under ``rejected/``, apart from
    the kept ones, for inspecting the checks."""
    batch_prompts: int = 64
    """Prompts per engine call (each with n requests); also the granularity of commits
    and resume: a prompt's samples are always committed together."""

    def check(self):
        for name in ("n", "max_tokens", "batch_prompts"):
            if getattr(self, name) < 1:
                yield name, f"must be >= 1, got {getattr(self, name)}"
        if self.temperature < 0:
            yield "temperature", f"must be >= 0, got {self.temperature}"
        if self.temperature == 0 and self.n > 1:
            yield "n", f"must be 1 with temperature 0 (greedy decoding gives one answer), got {self.n}"
        if not 0.0 < self.top_p <= 1.0:
            yield "top_p", f"must be in (0, 1], got {self.top_p}"
        if self.top_k < 0:
            yield "top_k", f"must be >= 0 (0 = off), got {self.top_k}"
        if not 0.0 <= self.min_p <= 1.0:
            yield "min_p", f"must be in [0, 1], got {self.min_p}"
        for i, token in enumerate(self.stop_token_ids):
            if token < 0:
                yield f"stop_token_ids[{i}]", f"must be >= 0, got {token}"
        for i, text in enumerate(self.stop):
            if not text:
                yield f"stop[{i}]", "must not be empty"
        if self.score != "mean_logprob" and not _IMPORT_PATH.fullmatch(self.score):
            yield "score", f"must be 'mean_logprob' or package.module:function, got {self.score!r}"
        if not self.prompt_field:
            yield "prompt_field", "must name a record field"
        if self.keep == "best_of_n" and self.score == "mean_logprob" and not self.mean_logprob:
            yield "mean_logprob", "must be true for keep: best_of_n with score: mean_logprob (its score)"
        if self.score != "mean_logprob" and self.keep != "best_of_n":
            yield "score", f"is only used by keep: best_of_n (keep is {self.keep!r}); remove it or set keep"
        if self.checks.min_tokens > self.max_tokens:
            yield (
                "checks.min_tokens",
                f"({self.checks.min_tokens}) is above generate.max_tokens ({self.max_tokens}): every sample "
                "would be rejected; lower it or raise generate.max_tokens",
            )


@dataclass(frozen=True)
class JobSpec:
    teacher: TeacherSpec
    """The teacher model and the vLLM engine that runs it."""
    corpus: CorpusSpec
    """Where the text comes from."""
    output: OutputSpec
    """Where the label shards go."""
    packing: PackingSpec = field(default_factory=PackingSpec)
    """How text becomes token sequences."""
    labels: LabelsSpec = field(default_factory=LabelsSpec)
    """What is stored per position."""
    hidden: HiddenSpec = field(default_factory=HiddenSpec)
    """Hidden-state samples, written to their own shards (off by default)."""
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    """Ray execution (replicas, resources, retries); used by run-ray and submit only."""
    generate: GenerateSpec | None = None
    """Sequence-level distillation: the teacher writes the responses (``labelgen generate``;
    docs/GENERATE.md). None: a labeling job (``labelgen run``)."""

    def gpus_per_replica(self, cluster_has_gpus: bool) -> float:
        """GPUs one replica reserves: cluster.gpus_per_replica, else TP x PP (0 without GPUs)."""
        if self.cluster.gpus_per_replica is not None:
            return self.cluster.gpus_per_replica
        return float(self.model_parallel_size()) if cluster_has_gpus else 0.0

    def model_parallel_size(self) -> int:
        """GPUs one teacher engine spans: tensor_parallel_size x pipeline_parallel_size."""
        args = self.teacher.engine_args
        size = 1
        for key in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = args.get(key, 1)
            size *= value if isinstance(value, int) and value >= 1 else 1
        return size

    def check(self):
        for where in find_secrets(self.to_dict()):
            if where == "output.url" or where.startswith("corpus.sources["):
                continue  # reported by OutputSpec / CorpusSpec with the URL-specific fix
            yield (
                where,
                "looks like a credential; specs are saved next to the labels and shared, so credentials "
                "come from the environment (AWS_* variables, ~/.aws, GOOGLE_APPLICATION_CREDENTIALS)",
            )
        args = self.teacher.engine_args
        for key in ("tensor_parallel_size", "pipeline_parallel_size"):
            if key in args and (not isinstance(args[key], int) or args[key] < 1):
                yield f"teacher.engine_args.{key}", f"must be an integer >= 1, got {args[key]!r}"
        gpus = self.cluster.gpus_per_replica
        if gpus:
            parallel = self.model_parallel_size()
            if gpus < parallel:
                yield (
                    "cluster.gpus_per_replica",
                    f"({gpus}) is fewer than the teacher's tensor_parallel_size x pipeline_parallel_size "
                    f"({parallel}); set it to {parallel} or leave it null",
                )
        limit = self.teacher.max_model_len
        if limit is not None and self.packing.seq_len >= limit and self.generate is None:
            yield (
                "packing.seq_len",
                f"({self.packing.seq_len}) must be < teacher.max_model_len ({limit}): vLLM needs room for "
                "the one token each request generates",
            )
        # hidden.layers needs no enforce_eager: a compiled engine takes hidden states from the
        # model's aux outputs where the model has them (vLLM's SupportsEagle3 models), which
        # only the worker can tell; it refuses the others at start-up, naming enforce_eager.
        if self.hidden.layers and self.labels.extraction == "public":
            yield "labels.extraction", "must be 'hook' or 'auto' when hidden.layers is set"
        gen = self.generate
        if gen is not None:
            if not gen.labels and (self.hidden.layers or self.labels.draws):
                yield (
                    "generate.labels",
                    "must be true when hidden.layers or labels.draws is set (they are teacher labels of "
                    "the kept samples); set it to true, or turn those off",
                )
            if limit is not None and gen.max_tokens + 1 >= limit:
                yield (
                    "generate.max_tokens",
                    f"({gen.max_tokens}) must be < teacher.max_model_len - 1 ({limit - 1}): the prompt needs "
                    "room, and labeling a response asks for one token more",
                )

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def content_hash(self) -> str:
        """sha256 of what determines the labels (everything but output.overwrite, cluster,
        labels.logits_budget_mib, and corpus.on_bad_source, whose choice the sources
        listing records).

        Fields added after a release are left out while at their default, so the spec of
        an output that release wrote hashes as it did and the job resumes there."""
        data = self.to_dict()
        data["output"] = {k: v for k, v in data["output"].items() if k != "overwrite"}
        data.pop("cluster", None)
        data["corpus"].pop("on_bad_source", None)
        data["labels"].pop("logits_budget_mib", None)
        if data.get("generate") is None:
            data.pop("generate", None)  # a labeling job hashes as before generation existed
        for section, name, default in _ADDED_FIELDS:
            if data[section].get(name) == default:
                del data[section][name]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# (section, field, default) of fields added to the spec after the first release: see
# JobSpec.content_hash.
_ADDED_FIELDS = (
    ("corpus", "max_messages", 256),
    ("corpus", "chat_roles", list(CHAT_ROLES)),
    ("corpus", "unit_mib", 256.0),
)


def load_spec(path: str, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Load and validate a job spec file; raises ConfigError listing every problem."""
    return load_config_file(JobSpec, path, overrides)


def load_spec_text(text: str, source: str = "job spec") -> JobSpec:
    """Load and validate a job spec from YAML text (a spec sent to the dataset service, its
    overrides already applied); raises ConfigError listing every problem, as :func:`load_spec`.

    Args:
        text: the YAML document.
        source: what the messages call it (e.g. ``job spec of nlp/web``).
    """
    if not isinstance(text, str):
        raise ConfigError([f"the spec must be YAML text, got {kind(text)} {show(text)}"], source)
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            [f"the spec is {size:,} bytes, over the {MAX_CONFIG_BYTES:,}-byte limit of a job spec"], source
        )
    data, problem = read_yaml(text)
    if problem is not None:
        raise ConfigError([f"{source} {problem}"], source)
    if data is None:
        data = {}  # only comments: every field takes its default (and the required ones are named)
    if not isinstance(data, dict):
        raise ConfigError(
            [
                "the top level must be a mapping of section names to values (`teacher:` on its own "
                f"line, ...), got {kind(data)} {show(data)}"
            ],
            source,
        )
    return load_config(JobSpec, data, source=source)
