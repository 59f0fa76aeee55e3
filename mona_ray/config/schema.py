"""The typed schema of every entry point's config (Hydra structured configs).

Each YAML file in ``mona_ray/conf`` starts with ``defaults: [<name>_schema, _self_]``, so Hydra
merges it onto one of the top-level classes below and rejects a key the class does not have
or a value of the wrong type, naming the key. Rules that types cannot express (allowed
values, positive sizes, ranges) are attached to the fields (``one_of``, ``positive``, ...)
and checked by :func:`mona_ray.config.validate`.

The shared sections (``ModelConfig``, ``SaeConfig``, ``RenderConfig``, ``PoolConfig``,
``EmbedConfig``) are the same classes in every entry point; an entry point whose defaults
differ sets them in its ``default_factory`` (e.g. the SAE tools run the model in bf16).
Defaults equal the YAML files' values (tested), which remain the commented reference.

"auto or a number" settings (``embed.num_actors``, ``embed.torch_threads``) are typed
``Optional[Union[int, str]]``: Hydra accepts ``4``, ``auto`` or ``null`` and rejects ``4.5``;
``validate`` rejects any string but ``auto``.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

from omegaconf import MISSING

AutoInt = Optional[Union[int, str]]  # "auto", null or an int

DTYPES = ("auto", "bfloat16", "float16", "float32")
SELECT_METHODS = ("mona", "rds", "bm25", "dsir", "dense", "random", "nait")
REPRESENTATIONS = ("sae", "mlp_gate", "hidden")
POOLINGS = ("mean", "sum")
EXCLUDES = ("special", "none", "template")
SIMILARITIES = ("jaccard", "cosine", "euclidean")


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


# ----------------------------------------------------------------------------- shared sections


@dataclass
class ModelConfig:
    """The language model (``model.*``)."""

    path: str = "embedded:smollm2-135m-instruct"  # or a local Hugging Face checkpoint folder (safetensors)
    dtype: str = one_of(*DTYPES)  # auto: bf16 where native (CUDA, CPUs with AVX-512 BF16/AMX), else fp32
    device: str = "auto"  # auto: a GPU per actor when the cluster has GPUs, else CPU; or cpu, cuda, cuda:N
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"  # passed to transformers' from_pretrained


@dataclass
class SaeConfig:
    """The sparse autoencoder to read (``sae.*``)."""

    path: Optional[str] = "${mona_ray.asset:sae/smollm2-135m-instruct}"  # sparsify root (layers.N/) or SAELens folder
    format: str = one_of("auto", "sparsify", "saelens")
    hookpoint: str = "layers.28"  # sparsify naming: the OUTPUT of block 28; SAELens blocks.N.hook_resid_* accepted
    k: Optional[int] = positive(None)  # TopK K; null = the SAE's own


@dataclass
class RenderConfig:
    """How a record becomes the token sequence the model sees (``render.*``)."""

    mode: str = one_of("chat_template", "plain")  # plain: message contents joined by blank lines
    system_prompt: Optional[str] = None  # null keeps the template's default; "" or text replaces it
    max_length: int = positive(512)  # tokens; longer samples are truncated


@dataclass
class PoolConfig:
    """Which tokens are pooled into a sample's vector, and how (``pool.*``)."""

    method: str = one_of(*POOLINGS)  # mean (paper) | sum (ablation: favours long samples)
    exclude: str = one_of(*EXCLUDES)  # special (BOS/role markers, incl. the attention sink) | none | template


@dataclass
class EmbedConfig:
    """The embedding engine and its feature store (``embed.*``); the evaluation reads the
    engine and store settings, the pipeline all of them."""

    representation: str = one_of(*REPRESENTATIONS)  # sae (MoNA) | mlp_gate (polysemantic ablation) | hidden
    mlp_k: Optional[int] = positive(None)  # K for mlp_gate; null: the SAE's K
    rows_per_unit: int = positive(256)  # rows per work unit / engine call / store part (scheduling and resume)
    token_budget: int = positive(8192)  # padded tokens per micro-batch (rows are length-sorted within a unit)
    pad_multiple: int = positive(16)  # rows padded to a multiple of this, batched only with equal lengths
    max_batch_rows: int = positive(64)
    sae_chunk_tokens: int = positive(4096)  # tokens per SAE-encode chunk (bounds memory at 131k latents)
    value_dtype: str = one_of("float32", "float16")  # dtype of stored activation values
    num_actors: AutoInt = positive("auto", auto=True)  # auto: one per GPU, or one on CPU
    actor_num_cpus_cpu: float = 0.5  # CPUs per actor on a CPU cluster (fractional: read/write tasks keep running)
    actor_num_cpus_gpu: float = 2  # CPUs per actor next to a GPU
    actor_resources: Dict[str, float] = field(default_factory=dict)  # extra Ray resources per actor, e.g. {a100: 1}
    torch_threads: AutoInt = positive("auto", auto=True)  # torch CPU threads; auto/null: the engine's/torch's default
    store_dir: Optional[str] = None  # the feature store; null: <run.output_dir>/embeddings
    executor: str = one_of("local", "ray")  # evaluation only: the model pass in this process, or on Ray actors


# ----------------------------------------------------------------------------- python -m mona_ray.run


@dataclass
class RunSection:
    output_dir: str = "outputs/demo"  # one folder per run; re-running the same command resumes it
    overwrite: bool = False  # true: redo a finished run (published atomically; the old one stays readable till then)
    max_rejected_fraction: float = fraction(0.5, zero=True)  # fail when more of a set's rows are rejected
    keep_runs: int = positive(2)  # finished runs kept under output_dir/runs/ (the published one included)
    lock_stale_s: int = positive(300)  # a lease on output_dir without a heartbeat this long is broken
    lock_wait_s: int = positive(0, zero=True)  # wait this long for another run's lease (0: refuse at once)


@dataclass
class SourceConfig:
    paths: List[str] = field(default_factory=lambda: ["${mona_ray.asset:demo/source.parquet}"])  # files, folders, globs


@dataclass
class TargetConfig:
    paths: List[str] = field(default_factory=lambda: ["${mona_ray.asset:demo/target_gsm8k.parquet}"])


@dataclass
class SelectConfig:
    method: str = one_of(*SELECT_METHODS)  # mona (the paper) or a baseline (docs/evaluation.md)
    similarity: str = one_of(*SIMILARITIES)  # jaccard (paper) | cosine | euclidean
    ratio: Optional[float] = fraction(0.05)  # keep this share of the source rows (rounded up)...
    count: Optional[int] = positive(None)  # ...or exactly this many
    score_batch_rows: int = positive(4096)
    # aggregation over the target examples: prototype (the paper: one mean) | clusters (one prototype per
    # cluster of target rows, silhouette picks their number; a row scores its best cluster) | round_robin
    # (one ranking per target row, interleaved, as RDS+)
    aggregate: str = one_of("clusters", "prototype", "round_robin")  # the first is the default
    prototype_mass: float = fraction(0.65)  # < 1: each prototype (codes) keeps its top latents carrying this share of its L1
    row_mass: float = fraction(1.0)  # < 1: each scored row (SAE codes) keeps its top latents carrying this share of its L1
    cluster_seed: int = 0
    max_clusters: Optional[int] = positive(None)  # null: up to half the target rows (at most 64)
    # how each prototype is cut, from the target rows alone (scoring.table.cut_prototypes): fixed (prototype_mass,
    # always) | structure (prototype_mass only when the target rows split into clusters; a target without cluster
    # structure keeps its full prototype) | support (each prototype keeps as many latents as its median member row)
    mass_rule: str = one_of("fixed", "structure", "support")
    min_silhouette: float = fraction(0.25, zero=True)  # clusters: a best silhouette below this means one cluster
    # method=rds: published (Ivison et al. 2025's code: hidden_states[-1], the last block through the final norm;
    # targets in file order, a target whose next row is taken spends its turn) | hooked_block (before issue 23:
    # sae.hookpoint's block without the final norm; targets in id order, a turn skips to the next free row)
    rds_variant: str = one_of("published", "hooked_block")
    # settings of a baseline selector (its constructor's arguments), e.g. select.bm25={aggregate: max}
    random: Dict[str, Any] = field(default_factory=dict)
    bm25: Dict[str, Any] = field(default_factory=dict)
    dsir: Dict[str, Any] = field(default_factory=dict)
    dense: Dict[str, Any] = field(default_factory=dict)
    nait: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ReportConfig:
    explain: bool = True  # explain.md/json: the prototype's top latents and why each row was selected
    trainer_format: str = one_of("auto", "messages")  # dataset_info.json for LLaMA-Factory (docs/training.md)


@dataclass
class RayConfig:
    address: Optional[str] = None  # null: $RAY_ADDRESS if set, else a local Ray started for this run
    num_cpus: Optional[int] = positive(None)
    num_gpus: Optional[int] = positive(None, zero=True)
    task_num_cpus: float = 0.5
    log_to_driver: bool = False


@dataclass
class RunConfig:
    """``python -m mona_ray.run`` (``conf/config.yaml``)."""

    run: RunSection = field(default_factory=RunSection)
    source: SourceConfig = field(default_factory=SourceConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # the default selector reads the middle block (docs/evaluation.md); the evaluation keeps layers.28 as its reference
    sae: SaeConfig = field(default_factory=lambda: SaeConfig(hookpoint="layers.15"))
    render: RenderConfig = field(default_factory=RenderConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# ----------------------------------------------------------------------------- python -m mona_ray.evaluate


@dataclass
class EvalDataConfig:
    pool: Optional[str] = None  # labelled pool: .parquet / .jsonl / .json
    targets: Any = None  # {name: path, ...}, or a list of paths (each named by its file stem)
    relevance: Optional[str] = None  # JSON object: target name -> list of pool domains counted as relevant
    # a suite (python -m mona_ray.evaluation.suite) instead of the three above: its pool, targets, relevance and,
    # per target, the pool categories left out of that target's ranking
    suite: Optional[str] = None
    domain_column: str = "domain"
    id_column: str = "id"


@dataclass
class MonaVariantsConfig:
    """The MoNA variants scored from the one pass over the pool."""

    representations: List[str] = list_of(*REPRESENTATIONS, default=list(REPRESENTATIONS))
    poolings: List[str] = list_of(*POOLINGS, default=list(POOLINGS))
    similarities: List[str] = list_of(*SIMILARITIES, default=list(SIMILARITIES))
    excludes: List[str] = list_of(*EXCLUDES, default=["none", "special", "template"])  # sae/mean/jaccard under each
    hookpoints: List[str] = field(default_factory=lambda: ["layers.15", "layers.28"])  # blocks with an SAE
    ks: List[int] = positive([16, 32, 128])  # sae/mean/jaccard with these K instead of the SAE's own
    # sae/mean at sae.hookpoint (and at each of hookpoints) aggregated over the target examples:
    # "<prototype|clusters|round_robin>/<similarity>/<prototype mass>[/<row mass>]", e.g. clusters/jaccard/0.65/0.75
    aggregations: List[str] = field(default_factory=lambda: [
        "prototype/jaccard/0.65", "clusters/jaccard/1.0", "clusters/jaccard/0.65", "clusters/jaccard/0.65/0.75",
        "clusters/cosine/1.0",
        "round_robin/jaccard/1.0", "round_robin/cosine/1.0"])
    aggregation_hookpoints: List[str] = field(default_factory=lambda: ["layers.15", "layers.28"])
    cluster_seed: int = 0
    rds: bool = True  # the RDS+ baseline as published (select.rds_variant=published): the last layer after the final norm


@dataclass
class NaitConfig:
    layers: Any = "all"  # all blocks up to sae.hookpoint, or a list of block numbers
    layer_norms: List[str] = list_of("none", "zscore", default=["none", "zscore"])


@dataclass
class Figure4Config:
    targets: List[str] = field(default_factory=list)  # two of the evaluated targets; empty: the first two
    latents: int = positive(64)


def _text_selectors() -> Dict[str, Dict[str, Any]]:
    return {"random": {"seed": 0}, "bm25": {"aggregate": "mean", "progress": True},
            "dsir": {"num_buckets": 10000, "gumbel": False, "progress": True, "min_example_length": 100},
            "dense": {"max_length": 256, "batch_size": 64, "dtype": "bfloat16"}}


@dataclass
class EvalConfig:
    """``python -m mona_ray.evaluate`` (``conf/eval/default.yaml``)."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    output_dir: str = "outputs/eval"
    cache_dir: str = "~/.cache/mona_ray/eval"  # the dense baseline's embeddings, by content
    progress: bool = True
    k: List[Any] = size_or_share([50, 100, 200, "5%"])  # precision@k / recall@k cut-offs; "N%" = share of the pool
    share_at: Union[int, str] = size_or_share("5%")  # selection size for the per-domain share
    curve_max: Union[int, str] = size_or_share("20%")  # precision@k curves run from k = 1 to this
    selectors: List[str] = list_of(*SELECT_METHODS, default=["random", "bm25", "dsir", "dense", "nait", "mona"])
    text_selectors: Dict[str, Dict[str, Any]] = field(default_factory=_text_selectors)  # settings per text selector
    model: ModelConfig = field(default_factory=ModelConfig)
    sae: SaeConfig = field(default_factory=SaeConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    embed: EmbedConfig = field(default_factory=lambda: EmbedConfig(store_dir="~/.cache/mona_ray/store",
                                                                   torch_threads=None))
    mona: MonaVariantsConfig = field(default_factory=MonaVariantsConfig)
    nait: NaitConfig = field(default_factory=NaitConfig)
    plot_selectors: List[str] = field(default_factory=lambda: [
        "random", "bm25", "dsir", "dense", "nait", "nait:zscore", "mona:sae/mean/jaccard",
        "mona:mlp_gate/mean/jaccard", "mona:hidden/mean/cosine"])
    figure4: Figure4Config = field(default_factory=Figure4Config)


# ----------------------------------------------------------------------------- SAE training and evaluation


@dataclass
class SaeDataConfig:
    path: str = MISSING  # Parquet / JSONL rows (alpaca, ShareGPT or messages)
    # rows with sha256(id) % 1000 < this are held out
    holdout_permille: int = _rule(10, lambda v: None if 0 <= v <= 1000 else "use 0 to 1000")
    seed: int = 0
    max_rows: Optional[int] = positive(None)


@dataclass
class CollectConfig:
    tokens: int = positive(2_000_000, zero=True)  # tokens per hookpoint in the activation cache
    batch_tokens: int = positive(8192)  # padded tokens per forward pass
    shard_tokens: int = positive(65536)


@dataclass
class HeldoutConfig:
    tokens: int = positive(16384, zero=True)  # held-out tokens for FVU / L0 / dead at each checkpoint (0: off)


@dataclass
class SaeShapeConfig:
    """The SAE being trained (``sae.*`` of ``train_sae``)."""

    expansion_factor: int = positive(16)
    num_latents: int = positive(0, zero=True)  # 0: d_in * expansion_factor
    k: int = positive(32)  # TopK K


@dataclass
class TrainLoopConfig:
    """Optimisation (``train.*`` of ``train_sae``)."""

    batch_size: int = positive(4096)  # tokens per step
    steps: int = positive(1000)
    lr: Optional[float] = None  # null: 2e-4 / sqrt(num_latents / 2^14)
    lr_warmup_steps: int = positive(50, zero=True)
    lr_decay_frac: float = fraction(0.2, zero=True)  # linear decay to 0 over this final fraction of the steps
    auxk_alpha: float = 1 / 32
    k_aux: Optional[int] = positive(None)  # null: d_in / 2
    dead_tokens: int = positive(2_000_000)  # dead = not fired in this many tokens
    b_dec_init: str = one_of("geometric_median", "mean", "zeros")
    seed: int = 0
    checkpoint_every: int = positive(100)
    shards_in_memory: int = positive(8)


@dataclass
class TrainSaeConfig:
    """``python -m mona_ray.train_sae`` (``conf/train_sae.yaml`` + a ``sae_train/`` preset)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(dtype="bfloat16"))
    hookpoints: List[str] = field(default_factory=lambda: ["layers.28"])  # layers.N = output of block N
    torch_threads: Optional[int] = positive(None)  # torch CPU threads (null: torch's default)
    render: RenderConfig = field(default_factory=RenderConfig)
    data: SaeDataConfig = field(default_factory=SaeDataConfig)
    cache_dir: Optional[str] = None  # set: collect activations to bf16 shards first
    collect: CollectConfig = field(default_factory=CollectConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    sae: SaeShapeConfig = field(default_factory=SaeShapeConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    out_dir: str = MISSING
    init_from: Optional[str] = None  # warm start: a sparsify SAE folder (same width) to continue training from
    save_dtype: str = one_of("bfloat16", "float16", "float32")
    provisional: bool = False


@dataclass
class SaeEvalDataConfig(SaeDataConfig):
    split: str = one_of("heldout", "train")  # heldout: the rows training never saw (same hash split)
    max_rows: Optional[int] = positive(400)


@dataclass
class SaeEvalConfig:
    """``python -m mona_ray.eval_sae`` (``conf/sae_eval.yaml``)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(dtype="bfloat16"))
    sae: SaeConfig = field(default_factory=lambda: SaeConfig(path=MISSING))
    hookpoints: List[str] = field(default_factory=lambda: ["${sae.hookpoint}"])  # the SAEs evaluated
    data: SaeEvalDataConfig = field(default_factory=SaeEvalDataConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    batch_tokens: int = positive(4096)
    torch_threads: Optional[int] = positive(None)
    out: Optional[str] = "sae_eval.json"  # the JSON report; null: print only


# config name (as for load_config) -> (ConfigStore name, schema)
SCHEMAS = {"config": ("run_schema", RunConfig), "eval/default": ("eval_schema", EvalConfig),
           "train_sae": ("train_sae_schema", TrainSaeConfig), "sae_eval": ("sae_eval_schema", SaeEvalConfig)}
