"""The typed schema of every entry point's config (Hydra structured configs): the one source
of every default and of every setting's documentation.

``mona_ray/config/__init__.py`` stores the four top-level classes below in Hydra's ConfigStore
(``run_schema``, ``eval_schema``, ``train_sae_schema``, ``sae_eval_schema``); each primary YAML
file in ``mona_ray/conf`` only names its class in its ``defaults:`` list (plus Hydra's own
settings), so the composed config is the class's defaults, then a preset or experiment
(``conf/experiment/*.yaml``, ``conf/sae_train/*.yaml``), then the command line. Hydra rejects
a key a class does not have or a value of the wrong type, naming the key. Rules that types
cannot express (allowed values, positive sizes, ranges) are attached to the fields
(``one_of``, ``positive``, ...) and checked by :func:`mona_ray.config.validate`.

Each field is documented by the string right below it (an attribute docstring, as Sphinx,
IDEs and :func:`field_docs` read it). The allowed values of every enumerated setting are the
tuples below (``DTYPES``, ``REPRESENTATIONS``, ...): the one place they are spelled, for
the rules here and for the code that branches on them.

The shared sections (``ModelConfig``, ``SaeConfig``, ``RenderConfig``, ``PoolConfig``,
``EmbedConfig``) are the same classes in every entry point; an entry point whose defaults
differ sets them in its ``default_factory`` (the pipeline reads ``SELECT_HOOKPOINT``, the
evaluation and the SAE tools ``REFERENCE_HOOKPOINT``; the SAE tools run the model in bf16).

"auto or a number" settings (``embed.num_actors``, ``embed.torch_threads``) are typed
``Optional[Union[int, str]]``: Hydra accepts ``4``, ``auto`` or ``null`` and rejects ``4.5``;
``validate`` rejects any string but ``auto``. (OmegaConf does not take ``Literal`` types, so
an enumerated setting is a ``str`` with a ``one_of`` rule.)
"""

import ast
import inspect
import textwrap
from dataclasses import dataclass, field, fields, is_dataclass
from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional, Union

from omegaconf import MISSING

AutoInt = Optional[Union[int, str]]  # "auto", null or an int

# ----------------------------------------------------------------------------- enumerations
# The allowed values of each enumerated setting; where a setting has a default, it is the first.

DTYPES = ("auto", "bfloat16", "float16", "float32")  # model.dtype
SAVE_DTYPES = ("bfloat16", "float16", "float32")  # train_sae's save_dtype
VALUE_DTYPES = ("float32", "float16")  # embed.value_dtype: stored activation values
SAE_FORMATS = ("auto", "sparsify", "saelens")  # sae.format
RENDER_MODES = ("chat_template", "plain")  # render.mode
POOLINGS = ("mean", "sum")  # pool.method
EXCLUDES = ("special", "none", "template")  # pool.exclude
REPRESENTATIONS = ("sae", "mlp_gate", "hidden")  # embed.representation
EXECUTORS = ("local", "ray")  # embed.executor (the evaluation's model pass)
SELECT_METHODS = ("mona", "rds", "bm25", "dsir", "dense", "random", "nait")  # select.method, the evaluation's selectors
TEXT_SELECTORS = ("random", "bm25", "dsir", "dense")  # the baselines that read text (select.<name>, text_selectors)
SIMILARITIES = ("jaccard", "cosine", "euclidean")  # select.similarity
AGGREGATES = ("clusters", "prototype", "round_robin")  # select.aggregate
MASS_RULES = ("fixed", "structure", "support")  # select.mass_rule
BACKGROUNDS = ("none", "idf", "contrast", "lr", "lda")  # select.background (scoring/background.py)
RDS_VARIANTS = ("published", "hooked_block")  # select.rds_variant
TRAINER_FORMATS = ("auto", "messages")  # report.trainer_format
NAIT_LAYER_NORMS = ("none", "zscore")  # nait.layer_norms
B_DEC_INITS = ("geometric_median", "mean", "zeros")  # train.b_dec_init
SPLITS = ("heldout", "train")  # eval_sae's data.split

# The blocks of the embedded SmolLM2-135M-Instruct (30 blocks) that its shipped SAEs read.
SELECT_HOOKPOINT = "layers.15"  # the middle block: the default selector (docs/evaluation.md)
SELECT_K = 16  # the default selector reads the shipped K=64 SAE's codes at K=16 (docs/evaluation.md, round 2)
SHIPPED_SAE = "sae/smollm2-135m-instruct"  # the SAEs shipped for the embedded SmolLM2 (package assets)
REFERENCE_HOOKPOINT = "layers.28"  # the penultimate block (the paper's choice): evaluation and SAE tools
SHIPPED_HOOKPOINTS = (SELECT_HOOKPOINT, REFERENCE_HOOKPOINT)


# ----------------------------------------------------------------------------- field rules
# A rule returns what is wrong with a value (None: fine); for a list it applies to each element.


def _rule(default: Any, check: Callable[[Any], Optional[str]]) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"check": check})
    return field(default=default, metadata={"check": check})


def one_of(*choices: str) -> Any:
    """A string among ``choices``; the default is the first."""
    return _rule(choices[0], lambda v: None if v in choices else f"use one of {', '.join(choices)}")


def list_of(*choices: str, default: List[str]) -> Any:
    """A list whose every element is among ``choices``."""
    return _rule(default, lambda v: None if v in choices else f"use one of {', '.join(choices)}")


def positive(default: Any, auto: bool = False, zero: bool = False) -> Any:
    """An int > 0 (>= 0 with ``zero``); null passes (the field's type says whether it may be
    null); with ``auto`` the string ``auto`` too."""
    def check(v):
        if v is None or (auto and v == "auto"):
            return None
        if isinstance(v, int) and not isinstance(v, bool) and (v > 0 or (zero and v == 0)):
            return None
        return ("use auto or " if auto else "use ") + ("an integer >= 0" if zero else "a positive integer")
    return _rule(default, check)


def fraction(default: Optional[float], zero: bool = False) -> Any:
    """A number in (0, 1] ([0, 1] with ``zero``); null passes."""
    def check(v):
        ok = v is None or ((v >= 0 if zero else v > 0) and v <= 1)
        return None if ok else f"must be in {'[' if zero else '('}0, 1]"
    return _rule(default, check)


def size_or_share(default: Any) -> Any:
    """A positive int or a share of the pool written ``N%``."""
    def check(v):
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return None
        if isinstance(v, str) and v.endswith("%"):
            try:
                if 0 < float(v[:-1]) <= 100:
                    return None
            except ValueError:
                pass
        return "use a positive integer or a share like 5%"
    return _rule(default, check)


@lru_cache(maxsize=None)
def field_docs(cls: type) -> Dict[str, str]:
    """``{field: its documentation}`` for a schema class (inherited fields included): the
    string right below each field in the source."""
    docs: Dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if is_dataclass(k)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, after in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def schema_classes(cls: type) -> List[type]:
    """``cls`` and every schema class nested in it (each once, outermost first)."""
    out = [cls]
    for f in fields(cls):
        if isinstance(f.type, type) and is_dataclass(f.type):
            out += [c for c in schema_classes(f.type) if c not in out]
    return out


# ----------------------------------------------------------------------------- shared sections


@dataclass
class ModelConfig:
    """The language model (``model.*``)."""

    path: str = "embedded:smollm2-135m-instruct"
    """``embedded:<name>`` (shipped with the package), a local Hugging Face checkpoint folder
    (safetensors), or a hub id ``org/name[@revision]`` (the run, the evaluation, train_sae and eval_sae:
    only the config, tokenizer and safetensors files are fetched, into the hub cache; never pickles)."""
    dtype: str = one_of(*DTYPES)
    """The forward pass dtype. auto: bf16 where native (CUDA, CPUs with AVX-512 BF16/AMX), else fp32."""
    device: str = "auto"
    """auto: a GPU per actor when the cluster has GPUs, else CPU; or cpu, cuda, cuda:N."""
    trust_remote_code: bool = False
    """Passed to transformers' from_pretrained (a checkpoint with its own modelling code)."""
    attn_implementation: str = "sdpa"
    """Passed to transformers' from_pretrained."""


@dataclass
class SaeConfig:
    """The sparse autoencoder to read (``sae.*``)."""

    path: Optional[str] = "${mona_ray.asset:" + SHIPPED_SAE + "}"
    """A sparsify root (holding ``layers.N/``) or a SAELens folder, or a hub id ``org/name[@revision]``
    (the run, the evaluation and eval_sae: only the files of the hooked layers are fetched); the default: the SAEs
    shipped for the embedded SmolLM2."""
    format: str = one_of(*SAE_FORMATS)
    """auto: told apart by the files."""
    hookpoint: str = REFERENCE_HOOKPOINT
    """Sparsify naming: ``layers.N`` is the OUTPUT of block N (SAELens ``blocks.N.hook_resid_post``
    / ``hook_resid_pre`` accepted); the model is cut after this block. The pipeline's default is
    ``layers.15`` (the middle block: it selects as well as the penultimate ``layers.28``, the paper's
    choice, at half the forward cost; docs/evaluation.md); the evaluation and eval_sae read ``layers.28``."""
    k: Optional[int] = positive(None)
    """TopK K (a ReLU/JumpReLU SAE keeps the K largest); null: the SAE's own. ``mona_ray.run``'s default
    reads the shipped SmolLM2 SAE at 16 and any other SAE at its own K (docs/evaluation.md, round 2)."""


@dataclass
class RenderConfig:
    """How a record becomes the token sequence the model sees (``render.*``)."""

    mode: str = one_of(*RENDER_MODES)
    """chat_template: the tokenizer's chat template | plain: the message contents joined by blank lines."""
    system_prompt: Optional[str] = None
    """null keeps the template's default; "" or a text replaces it."""
    max_length: int = positive(512)
    """Tokens; longer samples are truncated."""


@dataclass
class PoolConfig:
    """Which tokens are pooled into a sample's vector, and how (``pool.*``)."""

    method: str = one_of(*POOLINGS)
    """mean (the paper) | sum (ablation: favours long samples)."""
    exclude: str = one_of(*EXCLUDES)
    """special: BOS and role markers (incl. the attention sink) left out | none | template: content tokens only."""


@dataclass
class EmbedConfig:
    """The embedding engine and its feature store (``embed.*``); the evaluation reads the
    engine and store settings, the pipeline all of them."""

    representation: str = one_of(*REPRESENTATIONS)
    """sae (MoNA) | mlp_gate (the polysemantic ablation) | hidden (the raw residual)."""
    mlp_k: Optional[int] = positive(None)
    """K of the mlp_gate ablation; null: the SAE's K."""
    rows_per_unit: int = positive(256)
    """Rows per work unit, engine call and store part: the granularity of scheduling and resume."""
    token_budget: int = positive(8192)
    """Padded tokens per micro-batch (rows are length-sorted within a unit)."""
    pad_multiple: int = positive(16)
    """A row is padded to a multiple of this and batched only with rows of that length: its
    embedding then never depends on its neighbours (reproducible bit for bit)."""
    max_batch_rows: int = positive(64)
    """Rows per micro-batch at most."""
    sae_chunk_tokens: int = positive(4096)
    """Tokens per SAE-encode chunk (bounds memory at 131k latents)."""
    value_dtype: str = one_of(*VALUE_DTYPES)
    """The dtype of stored activation values."""
    num_actors: AutoInt = positive("auto", auto=True)
    """Embedding actors. auto: one per GPU, or one on CPU."""
    actor_num_cpus_cpu: float = 0.5
    """CPUs per actor on a CPU cluster (fractional, so Ray Data's read/write tasks are never starved)."""
    actor_num_cpus_gpu: float = 2
    """CPUs per actor next to a GPU."""
    actor_resources: Dict[str, float] = field(default_factory=dict)
    """Extra Ray resources per actor, e.g. {a100: 1} to pin actors to a node type."""
    torch_threads: AutoInt = positive("auto", auto=True)
    """Torch CPU threads; auto: the engine's choice, null: torch's default. On a machine shared
    with other jobs use 1: two OpenMP threads fighting for busy cores ran 5x slower."""
    store_dir: Optional[str] = None
    """The feature store; null: ``<run.output_dir>/embeddings``. Share it across runs (and with
    the evaluation) to refresh cheaply: the same model, SAE, rendering and dtype reuse its parts.
    A POSIX folder (local or shared), never an object-store URL."""
    executor: str = one_of(*EXECUTORS)
    """Evaluation only: the model pass in this process (local) or on Ray actors (ray: embed.num_actors,
    one GPU each when model.device is cuda); the same units, the same bits."""


# ----------------------------------------------------------------------------- python -m mona_ray.run


@dataclass
class RunSection:
    """Where a run writes and how it shares its folder (``run.*``)."""

    output_dir: str = "outputs/demo"
    """One folder per run; re-running the same command resumes it. A POSIX folder (local or
    shared: NFS, Lustre, a mounted bucket), never an object-store URL."""
    overwrite: bool = False
    """true: redo a finished run (published atomically; the old one stays readable till then)."""
    max_rejected_fraction: float = fraction(0.5, zero=True)
    """Fail when more than this share of a set's rows is rejected."""
    keep_runs: int = positive(2)
    """Finished runs kept under ``output_dir/runs/`` (the published one included)."""
    lock_stale_s: int = positive(300)
    """A lease on output_dir without a heartbeat this long is broken (another host died)."""
    lock_wait_s: int = positive(0, zero=True)
    """Wait this long for another run's lease to end or go stale (0: refuse at once)."""


@dataclass
class SourceConfig:
    """The rows to select from (``source.*``)."""

    paths: List[str] = field(default_factory=lambda: ["${mona_ray.asset:demo/source.parquet}"])
    """Files, folders or globs (.parquet, .jsonl(.gz), .json(.gz), .arrow, ``datasets``' save_to_disk
    folders; a DatasetDict split as ``folder/train``), hub datasets
    ``hf://datasets/org/name[@revision][/path or glob]``, or objects by URL (``s3://bucket/prefix/``,
    ``gs://...``, a glob of objects; read in place, credentials from the environment); the
    default: the shipped demo source set."""


@dataclass
class TargetConfig:
    """The examples of the target task (``target.*``)."""

    paths: List[str] = field(default_factory=lambda: ["${mona_ray.asset:demo/target_gsm8k.parquet}"])
    """Files, folders or globs, as source.paths; the default: the shipped GSM8K demo target."""


@dataclass
class SelectConfig:
    """How the source rows are scored and how many are kept (``select.*``)."""

    method: str = one_of(*SELECT_METHODS)
    """mona (the paper) | rds (RDS+) | bm25 | dsir | dense | random | nait (baselines, docs/evaluation.md)."""
    similarity: str = one_of(*SIMILARITIES)
    """jaccard (generalized Jaccard, the paper) | cosine | euclidean."""
    ratio: Optional[float] = fraction(0.05)
    """Keep this share of the source rows (rounded up)..."""
    count: Optional[int] = positive(None)
    """...or exactly this many."""
    score_batch_rows: int = positive(4096)
    """Source rows scored per batch."""
    aggregate: str = one_of(*AGGREGATES)
    """Over the target examples: prototype (the paper: one mean) | clusters (one prototype per cluster
    of target rows, silhouette picks their number; a row scores its best cluster) | round_robin (one
    ranking per target row, interleaved, as RDS+)."""
    prototype_mass: float = fraction(1.0)
    """< 1: each prototype keeps its largest latents carrying this share of its L1 mass (1.0: whole, the
    paper's formula and the default; docs/evaluation.md: a fixed cut loses on the leave-task-out suite).
    Codes only (sae, mlp_gate): dense readouts (hidden, rds) are compared whole."""
    row_mass: float = fraction(1.0)
    """< 1: each source row's SAE code, as it is compared, keeps its largest latents carrying this
    share of its L1 mass (the same fix on the row side; docs/evaluation.md: 0.75 helps MMLU at
    layers.15 but not at layers.28, so off)."""
    background: str = one_of(*BACKGROUNDS)
    """How the source pool's per-latent statistics weigh the score (scoring/background.py; SAE codes
    only): none (the paper's formula) | idf (each latent weighted by its rarity in the pool, rows and
    prototypes alike, then ``similarity``) | contrast (the prototype minus the pool's mean activation,
    clipped at 0) | lr (the mean log-likelihood ratio of target to pool over a row's latent mass) |
    lda (a closed-form linear probe of the target against the pool). docs/evaluation.md, round 3."""
    background_rows: int = positive(65536)
    """The pool statistics are read from about this many source rows: all of them up to this many,
    else whole store parts drawn by a hash of their names (the same parts on every run; a part in
    a smaller draw is in every larger one). Cached in the store by the rows read."""
    cluster_seed: int = 0
    """Seed of the target-row clustering."""
    max_clusters: Optional[int] = positive(None)
    """null: silhouette picks up to half the target rows (at most 64)."""
    mass_rule: str = one_of(*MASS_RULES)
    """How each prototype is cut, from the target rows alone (scoring.table.cut_prototypes): fixed
    (prototype_mass, always) | structure (prototype_mass only when the target rows split into clusters;
    one cluster keeps its full prototype) | support (as many latents as its median member row)."""
    min_silhouette: float = fraction(0.5, zero=True)
    """clusters: a best silhouette below this means one cluster, exactly the paper's one prototype. 0.5
    is Kaufman and Rousseeuw's "reasonable structure" (0.25: "weak"); chosen on the leave-task-out suite's
    round 1 and confirmed on round 2 (docs/evaluation.md): single-task targets keep one prototype,
    a mixture like BBH splits into its tasks."""
    rds_variant: str = one_of(*RDS_VARIANTS)
    """method=rds: published (Ivison et al. 2025's code: the last block through the final norm, HF
    hidden_states[-1]; targets in file order; a target whose next row is taken spends its turn) |
    hooked_block (sae.hookpoint's block, no final norm; targets in id order; a turn skips to the next
    free row: the variant before issue 23)."""
    random: Dict[str, Any] = field(default_factory=dict)
    """Settings of the random baseline (its constructor's arguments), e.g. ``select.random={seed: 1}``."""
    bm25: Dict[str, Any] = field(default_factory=dict)
    """Settings of the bm25 baseline, e.g. ``select.bm25={aggregate: max}`` (mona_ray/selectors/)."""
    dsir: Dict[str, Any] = field(default_factory=dict)
    """Settings of the dsir baseline (mona_ray/selectors/)."""
    dense: Dict[str, Any] = field(default_factory=dict)
    """Settings of the dense baseline (mona_ray/selectors/)."""
    nait: Dict[str, Any] = field(default_factory=dict)
    """Settings of the nait baseline (mona_ray/selectors/)."""


@dataclass
class ReportConfig:
    """What a run writes beside the selection (``report.*``)."""

    explain: bool = True
    """explain.md/json: the prototype's top latents and why each row was selected."""
    trainer_format: str = one_of(*TRAINER_FORMATS)
    """dataset_info.json for LLaMA-Factory: auto (the records' own format when uniform, else
    selected.messages.jsonl) | messages (always the messages file); see docs/training.md."""


@dataclass
class RayConfig:
    """The Ray cluster (``ray.*``)."""

    address: Optional[str] = None
    """null: $RAY_ADDRESS if set, else a local Ray started for this run."""
    num_cpus: Optional[int] = positive(None)
    """CPUs of a local Ray started for this run (null: Ray's default, all)."""
    num_gpus: Optional[int] = positive(None, zero=True)
    """GPUs of a local Ray started for this run (null: Ray's default, all)."""
    task_num_cpus: float = 0.5
    """CPUs per task (prepare, score, the baselines' passes)."""
    log_to_driver: bool = False
    """Show the workers' logs on the driver."""


@dataclass
class RunConfig:
    """``python -m mona_ray.run`` (primary config ``conf/config.yaml``). The defaults run the
    embedded demo: SmolLM2-135M-Instruct and its shipped SAE on a small permissively licensed
    source set, selecting for GSM8K."""

    run: RunSection = field(default_factory=RunSection)
    """Where the run writes."""
    source: SourceConfig = field(default_factory=SourceConfig)
    """The rows to select from."""
    target: TargetConfig = field(default_factory=TargetConfig)
    """The target task's examples."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The language model."""
    sae: SaeConfig = field(default_factory=lambda: SaeConfig(hookpoint=SELECT_HOOKPOINT,
                                                             k="${mona_ray.select_k:${sae.path}}"))
    """The SAE; the pipeline reads the middle block (``layers.15``); ``sae.k``: the shipped SmolLM2 SAE
    (trained at K=64) is read with each token's 16 strongest latents (docs/evaluation.md, round 2),
    any other SAE at its own K unless ``sae.k`` is set."""
    render: RenderConfig = field(default_factory=RenderConfig)
    """How records are rendered."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """How tokens are pooled."""
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    """The embedding engine and feature store."""
    select: SelectConfig = field(default_factory=SelectConfig)
    """The selection."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """What is written beside the selection."""
    ray: RayConfig = field(default_factory=RayConfig)
    """The Ray cluster."""


# ----------------------------------------------------------------------------- python -m mona_ray.evaluate


@dataclass
class EvalDataConfig:
    """The labelled pool and the targets (``data.*`` of the evaluation)."""

    pool: Optional[str] = None
    """The labelled pool: .parquet / .jsonl / .json (alpaca, ShareGPT or messages rows)."""
    targets: Any = None
    """{name: path, ...}, or a list of paths (each named by its file stem)."""
    relevance: Optional[str] = None
    """A JSON object: target name -> the list of pool domains counted as relevant."""
    suite: Optional[str] = None
    """Instead of the three above: ``DIR/suite.json`` from ``python -m mona_ray.evaluation.suite`` (its
    pool, targets, relevance and, per target, the pool categories left out of that target's ranking)."""
    domain_column: str = "domain"
    """The pool's column holding a row's domain."""
    id_column: str = "id"
    """The column holding a row's id."""


@dataclass
class MonaVariantsConfig:
    """The MoNA variants scored from the one pass over the pool (``mona.*``)."""

    representations: List[str] = list_of(*REPRESENTATIONS, default=list(REPRESENTATIONS))
    """Readouts scored (each with every pooling and similarity)."""
    poolings: List[str] = list_of(*POOLINGS, default=list(POOLINGS))
    """Poolings scored."""
    similarities: List[str] = list_of(*SIMILARITIES, default=list(SIMILARITIES))
    """Similarities scored."""
    excludes: List[str] = list_of(*EXCLUDES, default=["none", "special", "template"])
    """sae/mean/jaccard under each pool.exclude rule."""
    hookpoints: List[str] = field(default_factory=lambda: list(SHIPPED_HOOKPOINTS))
    """sae/mean/jaccard at each block with an SAE under sae.path (others skipped)."""
    ks: List[int] = positive([16, 32, 128])
    """sae/mean/jaccard with these K instead of the SAE's own."""
    aggregations: List[str] = field(default_factory=lambda: [
        "clusters@0.5/jaccard/1.0",  # the run's default selector (at layers.15/k=16)
        "prototype/jaccard/0.65", "clusters/jaccard/1.0", "clusters/jaccard/0.65", "clusters/jaccard/0.65/0.75",
        "clusters/cosine/1.0",
        "round_robin/jaccard/1.0", "round_robin/cosine/1.0"])
    """sae/mean at sae.hookpoint (and at each of aggregation_hookpoints) aggregated over the target
    examples (issue 14): ``<prototype|clusters|round_robin>/<similarity>/<prototype mass>[/<row mass>]``,
    e.g. ``clusters/jaccard/0.65/0.75`` (each pool row cut to 75% of its mass, as select.row_mass=0.75).
    Mass < 1: each prototype keeps its largest latents carrying that share of its L1 mass (1.0: the
    paper's formula). Rules from the target rows (issue 23, select.mass_rule / min_silhouette):
    ``clusters@0.5/...``: one cluster unless the best silhouette reaches 0.5; ``.../structure:0.65``:
    cut to 0.65 only when the targets form clusters; ``.../support``: each prototype as sparse as its
    median member row."""
    aggregation_hookpoints: List[str] = field(default_factory=lambda: [*SHIPPED_HOOKPOINTS,
                                                                       f"{SELECT_HOOKPOINT}/k={SELECT_K}"])
    """Blocks the aggregations are also scored at; ``'layers.15/k=16'`` (quoted): the SAE at that block used
    at K=16 (with ``clusters@0.5/jaccard/1.0``: the run's default selector)."""
    cluster_seed: int = 0
    """Seed of the target-row clustering."""
    rds: bool = True
    """RDS+ as published (Ivison et al. 2025, select.rds_variant=published): position-weighted mean of
    the last block through the final norm (HF hidden_states[-1]: the model pass runs every block),
    cosine, their round robin over the target rows in file order."""


@dataclass
class NaitConfig:
    """The NAIT baseline (``nait.*`` of the evaluation)."""

    layers: Any = "all"
    """all: every block up to sae.hookpoint; or a list of block numbers."""
    layer_norms: List[str] = list_of(*NAIT_LAYER_NORMS, default=list(NAIT_LAYER_NORMS))
    """"none" is reported as nait, "zscore" as nait:zscore."""


@dataclass
class Figure4Config:
    """The latent-activation figure (``figure4.*``)."""

    targets: List[str] = field(default_factory=list)
    """Two of the evaluated targets, e.g. [gsm8k, mbpp]; empty: the first two."""
    latents: int = positive(64)
    """Latents shown."""


def _text_selectors() -> Dict[str, Dict[str, Any]]:
    return {"random": {"seed": 0}, "bm25": {"aggregate": "mean", "progress": True},
            "dsir": {"num_buckets": 10000, "gumbel": False, "progress": True, "min_example_length": 100},
            "dense": {"max_length": 256, "batch_size": 64, "dtype": "bfloat16"}}


@dataclass
class EvalConfig:
    """``python -m mona_ray.evaluate`` (primary config ``conf/eval/default.yaml``):
    ``data.pool=... data.targets=... data.relevance=...``; see docs/evaluation.md."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """The labelled pool and the targets."""
    output_dir: str = "outputs/eval"
    """Where the results document and plots go."""
    cache_dir: str = "~/.cache/mona_ray/eval"
    """The dense baseline's embeddings, by content (shared by every evaluation)."""
    progress: bool = True
    """Progress bars."""
    k: List[Any] = size_or_share([50, 100, 200, "5%"])
    """precision@k / recall@k cut-offs; "N%" = that share of the pool (rounded up)."""
    share_at: Union[int, str] = size_or_share("5%")
    """The selection size for the per-domain share."""
    curve_max: Union[int, str] = size_or_share("20%")
    """precision@k curves run from k = 1 to this."""
    selectors: List[str] = list_of(*SELECT_METHODS, default=["random", "bm25", "dsir", "dense", "nait", "mona"])
    """The selectors evaluated."""
    text_selectors: Dict[str, Dict[str, Any]] = field(default_factory=_text_selectors)
    """Settings of each text selector (mona_ray/selectors/). dsir's min_example_length: as
    data-selection, rows under 100 words score -inf (0: off; docs/baselines.md). dense in bf16:
    1.8x fp32 on CPU, embeddings within cosine 0.9999."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model side, as the pipeline's: one pass over the pool serves every variant."""
    sae: SaeConfig = field(default_factory=SaeConfig)
    """The SAE (reference block ``layers.28``; every block used must be <= sae.hookpoint)."""
    render: RenderConfig = field(default_factory=RenderConfig)
    """How records are rendered."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """The default token pooling and exclusion (the pipeline's pool.*)."""
    embed: EmbedConfig = field(default_factory=lambda: EmbedConfig(store_dir="~/.cache/mona_ray/store",
                                                                   torch_threads=None))
    """The engine and feature store: the same as a pipeline run's (point a pipeline's
    embed.store_dir here to share it), so either reuses what the other embedded."""
    mona: MonaVariantsConfig = field(default_factory=MonaVariantsConfig)
    """The MoNA variants scored from the one pass."""
    nait: NaitConfig = field(default_factory=NaitConfig)
    """The NAIT baseline."""
    plot_selectors: List[str] = field(default_factory=lambda: [
        "random", "bm25", "dsir", "dense", "nait", "nait:zscore", "mona:sae/mean/jaccard",
        "mona:mlp_gate/mean/jaccard", "mona:hidden/mean/cosine"])
    """The selectors drawn in the plots."""
    figure4: Figure4Config = field(default_factory=Figure4Config)
    """The latent-activation figure."""


# ----------------------------------------------------------------------------- SAE training and evaluation


@dataclass
class SaeDataConfig:
    """The text the SAE tools read (``data.*``)."""

    path: str = MISSING
    """Parquet / JSONL rows (alpaca, ShareGPT or messages)."""
    holdout_permille: int = _rule(10, lambda v: None if 0 <= v <= 1000 else "use 0 to 1000")
    """Rows with sha256(id) % 1000 < this are held out."""
    seed: int = 0
    """The order the rows are shuffled in (before max_rows)."""
    max_rows: Optional[int] = positive(None)
    """Keep at most this many rows, after the shuffle (null: all)."""


@dataclass
class CollectConfig:
    """The activation cache (``collect.*`` of ``train_sae``)."""

    tokens: int = positive(2_000_000, zero=True)
    """Tokens per hookpoint in the activation cache."""
    batch_tokens: int = positive(8192)
    """Padded tokens per forward pass."""
    shard_tokens: int = positive(65536)
    """Tokens per cache shard."""


@dataclass
class HeldoutConfig:
    """Held-out metrics during training (``heldout.*`` of ``train_sae``)."""

    tokens: int = positive(16384, zero=True)
    """Held-out tokens for FVU / L0 / dead at each checkpoint (0: off)."""


@dataclass
class SaeShapeConfig:
    """The SAE being trained (``sae.*`` of ``train_sae``)."""

    expansion_factor: int = positive(16)
    """Latents per input dimension."""
    num_latents: int = positive(0, zero=True)
    """0: d_in * expansion_factor."""
    k: int = positive(32)
    """TopK K."""


@dataclass
class TrainLoopConfig:
    """Optimisation (``train.*`` of ``train_sae``)."""

    batch_size: int = positive(4096)
    """Tokens per step."""
    steps: int = positive(1000)
    """Optimiser steps."""
    lr: Optional[float] = None
    """null: 2e-4 / sqrt(num_latents / 2^14)."""
    lr_warmup_steps: int = positive(50, zero=True)
    """Linear warm-up steps."""
    lr_decay_frac: float = fraction(0.2, zero=True)
    """Linear decay to 0 over this final fraction of the steps."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss (dead-latent revival)."""
    k_aux: Optional[int] = positive(None)
    """null: d_in / 2."""
    dead_tokens: int = positive(2_000_000)
    """A latent is dead when it has not fired in this many tokens."""
    b_dec_init: str = one_of(*B_DEC_INITS)
    """How the decoder bias starts."""
    seed: int = 0
    """Seed of the initialisation and of the batch order."""
    checkpoint_every: int = positive(100)
    """Steps between checkpoints."""
    shards_in_memory: int = positive(8)
    """Cache shards held in memory at once; batches are drawn across them."""


@dataclass
class TrainSaeConfig:
    """``python -m mona_ray.train_sae`` (primary config ``conf/train_sae.yaml``; a preset from
    ``conf/sae_train/``, e.g. ``sae_train=smollm2``, sets these). TopK SAE training (Gao et al.
    2024 / EleutherAI sparsify recipe); see docs/sae.md."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(dtype="bfloat16"))
    """The same section as the pipeline's; the forward pass in bf16."""
    hookpoints: List[str] = field(default_factory=lambda: [REFERENCE_HOOKPOINT])
    """Sparsify naming: layers.N = the output of block N; one SAE each."""
    torch_threads: Optional[int] = positive(None)
    """Torch CPU threads (null: torch's default)."""
    render: RenderConfig = field(default_factory=RenderConfig)
    """Texts are rendered as the pipeline renders them."""
    data: SaeDataConfig = field(default_factory=SaeDataConfig)
    """The training text."""
    cache_dir: Optional[str] = None
    """Set: collect activations to bf16 shards first."""
    collect: CollectConfig = field(default_factory=CollectConfig)
    """The activation cache."""
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    """Held-out metrics."""
    sae: SaeShapeConfig = field(default_factory=SaeShapeConfig)
    """The SAE trained."""
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    """Optimisation."""
    out_dir: str = MISSING
    """Where the SAEs (sparsify layout) and checkpoints go."""
    init_from: Optional[str] = None
    """Warm start: a sparsify SAE folder (same width) to continue training from."""
    save_dtype: str = one_of(*SAVE_DTYPES)
    """The dtype of the saved weights."""
    provisional: bool = False
    """Mark the saved SAEs provisional in their cfg.json (a run's manifest and the evaluation then say so)."""


@dataclass
class SaeEvalDataConfig(SaeDataConfig):
    """The text eval_sae reads (``data.*``)."""

    split: str = one_of(*SPLITS)
    """heldout: the rows training never saw (the same hash split as train_sae) | train."""
    max_rows: Optional[int] = positive(400)
    """Keep at most this many rows, after the shuffle (null: all)."""


@dataclass
class SaeEvalConfig:
    """``python -m mona_ray.eval_sae`` (primary config ``conf/sae_eval.yaml``): FVU, dead
    latents, L0 and delta CE of SAEs on held-out text."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(dtype="bfloat16"))
    """The same section as the pipeline's; the forward pass in bf16."""
    sae: SaeConfig = field(default_factory=lambda: SaeConfig(path=MISSING))
    """The SAEs: sae.path must be set."""
    hookpoints: List[str] = field(default_factory=lambda: ["${sae.hookpoint}"])
    """The SAEs evaluated, e.g. [layers.15,layers.28]; default: sae.hookpoint."""
    data: SaeEvalDataConfig = field(default_factory=SaeEvalDataConfig)
    """The held-out text."""
    render: RenderConfig = field(default_factory=RenderConfig)
    """Texts are rendered as the pipeline renders them."""
    batch_tokens: int = positive(4096)
    """Padded tokens per forward pass."""
    torch_threads: Optional[int] = positive(None)
    """Torch CPU threads (null: torch's default)."""
    out: Optional[str] = "sae_eval.json"
    """The JSON report; null: print only."""


# config name (as for load_config) -> (ConfigStore name, schema)
SCHEMAS = {"config": ("run_schema", RunConfig), "eval/default": ("eval_schema", EvalConfig),
           "train_sae": ("train_sae_schema", TrainSaeConfig), "sae_eval": ("sae_eval_schema", SaeEvalConfig)}
