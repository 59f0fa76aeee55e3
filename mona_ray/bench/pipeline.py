"""``bench pipeline``: the real job end to end on an OpenHermes-2.5-shaped source set of ``--rows`` rows.

Everything but the weights is the product as shipped: ``mona_ray.run.run`` in this process
(this process is the Ray driver; Ray's workers are separate processes), Ray Data, the
product's defaults (chat-template rendering with SmolLM2's real tokenizer and template,
``render.max_length`` 512, ``embed.rows_per_unit`` 256, top 5%). What is built, once, in
``--work-dir`` and reused by later runs:

* **model**: a tiny random Llama (``--hidden`` wide, ``--layers`` blocks) that carries the
  embedded SmolLM2-135M-Instruct's tokenizer files and chat template (vocabulary, special
  ids), so rendering and tokenization cost what they cost with the real model, while the
  forward pass is nearly free: the benchmark measures the pipeline, not the model;
* **SAE**: a random sparsify-format TopK SAE (``--latents``, ``--sae-k``) for the model's
  penultimate block (``layers.{L-2}``, as the product's default ``layers.28`` of 30);
* **source**: ShareGPT records shaped like OpenHermes-2.5's (``conversations`` with
  ``from``/``value``, a system turn on ~10% of rows, ~1% multi-turn, ``source`` and
  ``category``, no ``id``: rows are named ``<folder>/<file>:<row>``), human turns averaging
  ~60 words and gpt turns ~200 (about 1.45 KB of text, 1.6 KB of JSON per record), words from a fixed
  vocabulary; ``--math-fraction`` of the rows are math-like (numbers, "how many", "total").
  ``json`` is ONE JSON array file (as ``openhermes2_5.json`` ships), ``jsonl`` one JSONL file,
  ``parquet`` ONE Parquet file with a single row group. Generated with numpy (a padded
  byte table per word, gathered and compacted per block of rows), once per (rows, format, seed);
* **target**: ``--target-rows`` GSM8K-like word problems (alpaca records) in a JSONL file.

Each run writes to a fresh ``runs/<stamp>`` folder (removed afterwards unless ``--keep``).
The report holds the manifest's per-stage wall times, counts, units and per-actor rows
(when the manifest has them), tokens/s, the driver's peak RSS over the run (``ray.init``
included: it happens inside ``run``), and the generation time, kept apart from the
pipeline's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..core.io import write_text
from .common import DEFAULT_OUT_DIR, BenchError, CpuMeter, fmt, peak_rss_mb, reset_peak_rss, status_mb, table

FORMATS = ("json", "jsonl", "parquet")
EXT = {"json": "json", "jsonl": "jsonl", "parquet": "parquet"}
GEN_VERSION = 1  # bump when the generated records change: old caches are then ignored
DEFAULT_WORK_DIR = DEFAULT_OUT_DIR / "pipeline_work"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=10_000, help="source rows (default: %(default)s)")
    p.add_argument("--format", default="json", help=f"source file format: {', '.join(FORMATS)} (default: %(default)s)")
    p.add_argument("--actors", type=int, default=2, help="embed.num_actors (default: %(default)s)")
    p.add_argument("--work-dir", default=None,
                   help=f"cache of model, SAE and data, and the runs' folders (default: {DEFAULT_WORK_DIR})")
    p.add_argument("--keep", action="store_true", help="keep the run's output folder (default: removed after the report)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for the run, repeatable (applied last)")
    p.add_argument("--target-rows", type=int, default=100, help="GSM8K-like target rows (default: %(default)s)")
    p.add_argument("--math-fraction", type=float, default=0.01,
                   help="share of math-like source rows (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=64, help="tiny model width (default: %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="tiny model blocks (default: %(default)s)")
    p.add_argument("--latents", type=int, default=2048, help="SAE latents (default: %(default)s)")
    p.add_argument("--sae-k", type=int, default=32, help="SAE TopK K (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)


# ----------------------------------------------------------------------------- vocabulary

_GENERAL = """the of and to a in is it you that he was for on are with as i his they be at one have this from or
had by not word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two has look
more day could go come did number sound no most people my over know water than call first who may down side been
now find any new work part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line differ turn cause much
mean before move right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light kind off need
house picture try us again animal point mother world near build self earth father head stand own page should
country found answer school grow study still learn plant cover food sun four between state keep eye never last let
thought city tree cross farm hard start might story saw far sea draw left late run while press close night real
life few north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend began idea
fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl usual young ready
above ever red list though feel talk bird soon body dog family direct pose leave song measure door product black
short numeral class wind question happen complete ship area half rock order fire south problem piece told knew
pass since top whole king space heard best hour better during hundred five remember step early hold west ground
interest reach fast verb sing listen six table travel less morning ten simple several vowel toward war lay
against pattern slow center love person money serve appear road map rain rule govern pull cold notice voice unit
power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest correct able
pound done beauty drive stood contain front teach week final gave green oh quick develop ocean warm free minute
strong special mind behind clear tail produce fact street inch multiply nothing course stay wheel full force blue
object decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant fill east
paint language among""".split()

_TOPICS = {
    "coding": """function return python code list string variable loop class def import print array value error
file data type int true false method object module library compile debug syntax query database server request
response json parse index key dictionary test output input algorithm recursion""".split(),
    "science": """energy cell atom molecule reaction temperature pressure species light force mass electron gene
protein planet orbit gravity acid oxygen carbon evolution climate wave particle velocity chemical bond enzyme
organism experiment hypothesis""".split(),
    "writing": """story poem character write essay chapter scene describe dialogue narrator tone theme plot verse
stanza hero villain setting metaphor imagery draft reader author title journey dream memory""".split(),
    "general": """people world history country company market important business culture society government
policy economy health education community travel advice benefit reason opinion summary explain""".split(),
    "roleplay": """sword castle dragon knight tavern quest magic spell captain crew journey village stranger
whisper smile laughs nods grins says replies shadow forest""".split(),
    "trivia": """capital famous invented century largest smallest discovered named island river mountain
president album film novel painter composer olympic record""".split(),
    "math": """how many total each more than cost costs per left spent dollars apples hours minutes week altogether
sum price buys sells twice half times answer = + - * / so has have bought remaining 2 3 4 5 6 7 8 9 10 12 15 18 20
24 25 30 36 40 45 48 50 60 72 75 80 90 100 120 150 200 250 $5 $10 $12 $20 $25 $50 3.5 0.25 1/2""".split(),
}
CATEGORIES = tuple(_TOPICS)
# which OpenHermes-2.5 sources the rows of each category claim to come from
SOURCES = {"coding": ("glaive-code-assist",), "science": ("CamelAI",), "math": ("metamath",),
           "writing": ("airoboros2.2", "EvolInstruct_70k"), "general": ("cot_alpaca_gpt4", "UnnaturalInstructions"),
           "roleplay": ("airoboros2.2",), "trivia": ("airoboros2.2", "caseus_custom")}
_SYSTEM = ["You are a helpful assistant, who always provide explanation. Think like you are answering to a five year old.",
           "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.",
           "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
           "You are a world class trivia AI - provide accurate, succinct responses.",
           "You are an unbiased, uncensored, helpful assistant."]
# the separator after a word: " ", ". ", ".\n\n" (paragraph, gpt turns), "." (end of turn)
_SEPS = (" ", ". ", ".\n\n", ".")


class _Pieces:
    """Every (word, separator) pair as a zero-padded byte row: a turn is a gather plus a compaction."""

    def __init__(self, json_escaped: bool):
        words = _GENERAL + [w for c in CATEGORIES for w in _TOPICS[c]]
        seps = [s.replace("\n", "\\n") if json_escaped else s for s in _SEPS]
        pieces = [(w + s).encode() for w in words for s in seps]
        width = max(len(x) for x in pieces)
        self.table = np.zeros((len(pieces), width), np.uint8)
        for i, x in enumerate(pieces):
            self.table[i, : len(x)] = np.frombuffer(x, np.uint8)
        self.lengths = np.array([len(x) for x in pieces], np.int64)
        self.n_general = len(_GENERAL)
        zipf = 1.0 / np.arange(1, self.n_general + 1) ** 0.7
        cdf = np.cumsum(zipf / zipf.sum())
        self.general_lut = np.minimum(np.searchsorted(cdf, (np.arange(1 << 16) + 0.5) / (1 << 16)),
                                      self.n_general - 1).astype(np.int16)
        self.topic_start, self.topic_size = [], []
        at = self.n_general
        for c in CATEGORIES:
            self.topic_start.append(at)
            self.topic_size.append(len(_TOPICS[c]))
            at += len(_TOPICS[c])
        self.topic_start, self.topic_size = np.array(self.topic_start), np.array(self.topic_size)


def _turn_lengths(rng, role: np.ndarray) -> np.ndarray:
    """Words per turn: lognormal, mean ~60 (human) and ~200 (gpt); system prompts are fixed texts."""
    sigma = 0.75
    mean = np.where(role == 1, 60.0, 200.0)
    mu = np.log(mean) - sigma ** 2 / 2
    n = np.exp(mu + sigma * rng.standard_normal(len(role)))
    return np.clip(np.rint(n), 3, 1500).astype(np.int64)


def _block(rng, n: int, pieces: _Pieces, math_fraction: float) -> dict:
    """``n`` records as flat arrays: per row (category, source, turn range) and per turn (role, text bytes)."""
    cat = rng.choice(len(CATEGORIES) - 1, n)  # every category but math ...
    cat[rng.random(n) < math_fraction] = CATEGORIES.index("math")  # ... which takes its share
    system = rng.random(n) < 0.10
    exchanges = np.where(rng.random(n) < 0.01, rng.integers(2, 5, n), 1)
    turns_per_row = exchanges * 2 + system
    t_row = np.repeat(np.arange(n), turns_per_row)
    first = np.r_[0, np.cumsum(turns_per_row)[:-1]]
    k = np.arange(len(t_row)) - np.repeat(first, turns_per_row)  # turn number within its row
    k = k - system[t_row]  # -1 = the system turn
    role = np.where(k < 0, 0, np.where(k % 2 == 0, 1, 2))  # 0 system, 1 human, 2 gpt
    talk = role > 0
    t_len = np.zeros(len(role), np.int64)
    t_len[talk] = _turn_lengths(rng, role[talk])
    # the words of every human/gpt turn, in one go (16-bit draws and lookup tables: fast enough for 1M rows)
    w_turn = np.repeat(np.flatnonzero(talk), t_len[talk])
    nw = len(w_turn)
    w_cat = cat[t_row[w_turn]]
    r_word, r_topic, r_sep = (rng.integers(0, 1 << 16, nw, dtype=np.uint16) for _ in range(3))
    word = pieces.general_lut[r_word].astype(np.int64)
    is_topic = r_topic < np.where(w_cat == CATEGORIES.index("math"), 1 << 15, 1 << 14)  # 50% / 25%
    tc = w_cat[is_topic]
    word[is_topic] = pieces.topic_start[tc] + ((r_word[is_topic].astype(np.int64) * pieces.topic_size[tc]) >> 16)
    sep = (r_sep < (1 << 16) // 12).astype(np.int64)
    sep[(r_sep >= (1 << 16) - (1 << 16) // 60) & (role[w_turn] == 2)] = 2
    sep[np.r_[w_turn[1:] != w_turn[:-1], True]] = 3
    piece = word * len(_SEPS) + sep
    g = pieces.table[piece]
    text = g[g != 0]  # the turns' bytes, back to back
    turn_bytes = np.zeros(len(role), np.int64)
    turn_bytes[talk] = np.add.reduceat(pieces.lengths[piece], np.r_[0, np.cumsum(t_len[talk])[:-1]])
    sys_pick = rng.integers(0, len(_SYSTEM), n)
    src_pick = rng.random(n)
    return {"cat": cat, "system": sys_pick, "src": src_pick, "turns_per_row": turns_per_row, "exchanges": exchanges, "role": role,
            "turn_bytes": turn_bytes, "text": text}


def _source_name(cat: int, u: float) -> str:
    names = SOURCES[CATEGORIES[cat]]
    return names[min(int(u * len(names)), len(names) - 1)]


_ROLE_NAMES = ("system", "human", "gpt")


def _json_lines(b: dict) -> list[bytes]:
    """One JSON object per record (texts are ASCII and already escaped)."""
    text = b["text"].tobytes()
    ends = np.cumsum(b["turn_bytes"])
    starts = ends - b["turn_bytes"]
    sys_json = [json.dumps(s).encode() for s in _SYSTEM]
    prefix = [b'{"from": "%s", "value": ' % r.encode() for r in _ROLE_NAMES]
    # a system turn gets a NUL placeholder (never in the text), replaced by its prompt per row
    frags = [prefix[r] + (b'"' + text[a:e] + b'"}' if r else b"\0}")
             for r, a, e in zip(b["role"].tolist(), starts.tolist(), ends.tolist())]
    out, t = [], 0
    for cat, s, u, nt in zip(b["cat"].tolist(), b["system"].tolist(), b["src"].tolist(), b["turns_per_row"].tolist()):
        conv = b", ".join(frags[t: t + nt]).replace(b"\0", sys_json[s], 1)
        t += nt
        out.append(b'{"conversations": [%s], "source": "%s", "category": "%s"}'
                   % (conv, _source_name(cat, u).encode(), CATEGORIES[cat].encode()))
    return out


def _arrow(b: dict):
    import pyarrow as pa

    sys_bytes = [s.encode() for s in _SYSTEM]
    sys_turns = np.flatnonzero(b["role"] == 0)
    # splice the system prompts into the text buffer: one concatenation, no per-turn Python
    tb = b["turn_bytes"].copy()
    row_of_turn = np.repeat(np.arange(len(b["cat"])), b["turns_per_row"])
    tb[sys_turns] = [len(sys_bytes[s]) for s in b["system"][row_of_turn[sys_turns]]]
    pieces, pos = [], 0
    ends = np.cumsum(b["turn_bytes"])
    for t in sys_turns.tolist():
        start = ends[t] - b["turn_bytes"][t]
        pieces.append(b["text"][pos:start].tobytes())
        pieces.append(sys_bytes[b["system"][row_of_turn[t]]])
        pos = ends[t]
    pieces.append(b["text"][pos:].tobytes())
    data = b"".join(pieces)
    offsets = np.r_[0, np.cumsum(tb)].astype(np.int32)
    value = pa.StringArray.from_buffers(len(tb), pa.py_buffer(offsets), pa.py_buffer(data))
    frm = pa.array(np.array(_ROLE_NAMES, dtype=object)[b["role"]], pa.string())
    turns = pa.StructArray.from_arrays([frm, value], names=["from", "value"])
    conv = pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(b["turns_per_row"])].astype(np.int32)), turns)
    src = [_source_name(c, u) for c, u in zip(b["cat"].tolist(), b["src"].tolist())]
    return pa.table({"conversations": conv, "source": pa.array(src, pa.string()),
                     "category": pa.array(np.array(CATEGORIES, dtype=object)[b["cat"]], pa.string())})


def generate_source(path: Path, rows: int, fmt: str, seed: int, math_fraction: float, block: int = 8192) -> dict:
    """Write the source file (atomically); returns what was generated."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng([seed, 12])
    pieces = _Pieces(json_escaped=fmt != "parquet")
    stats = {"rows": rows, "math_rows": 0, "system_rows": 0, "multi_turn_rows": 0, "turns": 0}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tables = []
    with open(tmp, "wb") as fh:
        if fmt == "json":
            fh.write(b"[\n")
        for lo in range(0, rows, block):
            n = min(block, rows - lo)
            b = _block(rng, n, pieces, math_fraction)
            stats["math_rows"] += int((b["cat"] == CATEGORIES.index("math")).sum())
            stats["system_rows"] += int((b["role"] == 0).sum())
            stats["multi_turn_rows"] += int((b["exchanges"] > 1).sum())
            stats["turns"] += len(b["role"])
            if fmt == "parquet":
                tables.append(_arrow(b))
                continue
            lines = _json_lines(b)
            if fmt == "json":
                fh.write((b"" if lo == 0 else b",\n") + b",\n".join(lines))
            else:
                fh.write(b"\n".join(lines) + b"\n")
        if fmt == "json":
            fh.write(b"\n]\n")
    if fmt == "parquet":
        t = pa.concat_tables(tables)
        pq.write_table(t, tmp, row_group_size=rows)
        rg = pq.ParquetFile(tmp).metadata.num_row_groups
        if rg != 1:
            raise BenchError(f"--rows={rows}: pyarrow wrote {rg} row groups, expected one")
    os.replace(tmp, path)
    stats["bytes"] = path.stat().st_size
    return stats


# ----------------------------------------------------------------------------- target

_NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Mark", "Tina", "Randy", "Joy", "Carla", "Ken"]
_ITEMS = ["apples", "pencils", "books", "cookies", "stickers", "marbles", "cupcakes", "toy cars"]


def gsm8k_like(n: int, seed: int) -> list[dict]:
    """Word problems with worked answers, in GSM8K's style (``#### <answer>`` last)."""
    rng = np.random.default_rng([seed, 8])
    out = []
    for i in range(n):
        name, item = _NAMES[rng.integers(len(_NAMES))], _ITEMS[rng.integers(len(_ITEMS))]
        a, b, c = (int(x) for x in rng.integers(2, 40, 3))
        kind = i % 4
        if kind == 0:
            q = f"{name} has {a} {item}. She buys {b} more bags with {c} {item} each. How many {item} does she have in total?"
            s = f"The bags hold {b} * {c} = {b * c} {item}.\nIn total she has {a} + {b * c} = {a + b * c} {item}."
            ans = a + b * c
        elif kind == 1:
            q = f"{name} earns ${a} an hour and works {b} hours a week. How much does {name} earn in {c} weeks?"
            s = f"In one week {name} earns {a} * {b} = ${a * b}.\nIn {c} weeks that is {a * b} * {c} = ${a * b * c}."
            ans = a * b * c
        elif kind == 2:
            tot = a * c + b
            q = f"A shop had {tot} {item}. It sold {c} boxes of {a} {item} each. How many {item} are left?"
            s = f"It sold {c} * {a} = {a * c} {item}.\nSo {tot} - {a * c} = {b} {item} are left."
            ans = b
        else:
            q = (f"{name} reads {a} pages on Monday and twice as many on Tuesday. How many pages does {name} "
                 f"read on both days altogether?")
            s = f"On Tuesday {name} reads 2 * {a} = {2 * a} pages.\nAltogether that is {a} + {2 * a} = {3 * a} pages."
            ans = 3 * a
        out.append({"instruction": q, "input": "", "output": f"{s}\n#### {ans}"})
    return out


# ----------------------------------------------------------------------------- model + SAE


def _atomic_dir(final: Path, build) -> Path:
    """Build a folder in a temporary sibling and rename it into place (a ``DONE`` file marks it)."""
    if (final / "DONE").exists():
        return final
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / "DONE").write_text("built by python -m mona_ray.bench pipeline\n")
    shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / "DONE").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process built it meanwhile
    return final


def tiny_model(work: Path, hidden: int, layers: int, seed: int) -> Path:
    """A random Llama with the embedded SmolLM2-135M-Instruct's tokenizer and chat template."""

    def build(d: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from ..core.model import ensure_embedded_model

        src = ensure_embedded_model()
        copied = [f for f in TOKENIZER_FILES if (src / f).exists()]
        for f in copied:
            shutil.copy2(src / f, d / f)
        tok = AutoTokenizer.from_pretrained(d)
        ref = json.loads((src / "config.json").read_text())
        pad = tok.pad_token_id if tok.pad_token_id is not None else ref.get("pad_token_id")
        heads = 4 if hidden % 4 == 0 else 1
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                          max_position_embeddings=ref.get("max_position_embeddings", 8192),
                          rms_norm_eps=ref.get("rms_norm_eps", 1e-5), pad_token_id=pad,
                          bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else ref.get("bos_token_id"),
                          eos_token_id=tok.eos_token_id if tok.eos_token_id is not None else ref.get("eos_token_id"),
                          tie_word_embeddings=True)
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
        for f in copied:  # save_pretrained must not have replaced the tokenizer files
            shutil.copy2(src / f, d / f)
        if not list(d.glob("*.safetensors")):
            raise BenchError(f"tiny model not written as safetensors in {d}")

    return _atomic_dir(work / f"model-llama-h{hidden}-l{layers}-s{seed}", build)


def random_sae(work: Path, d_in: int, latents: int, k: int, hookpoint: str, seed: int) -> Path:
    def build(d: Path) -> None:
        import torch

        from ..core.sae import SAE, save_sparsify

        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(latents, d_in, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        sae = SAE(W_enc=W_dec.clone(), b_enc=0.1 * torch.randn(latents, generator=g), W_dec=W_dec,
                  b_dec=0.1 * torch.randn(d_in, generator=g), k=k, hookpoint=hookpoint)
        save_sparsify(sae, d, extra_cfg={"note": "random SAE for bench pipeline"})

    return _atomic_dir(work / f"sae-d{d_in}-{latents}x{k}-{hookpoint}-s{seed}", build)


# ----------------------------------------------------------------------------- the run


def _check(args) -> None:
    if args.rows < 1:
        raise BenchError(f"--rows={args.rows} must be positive")
    if args.format not in FORMATS:
        raise BenchError(f"--format={args.format!r}: use one of {', '.join(FORMATS)}")
    if args.actors < 1:
        raise BenchError(f"--actors={args.actors} must be >= 1")
    if args.target_rows < 1:
        raise BenchError(f"--target-rows={args.target_rows} must be positive")
    if not 0 <= args.math_fraction <= 1:
        raise BenchError(f"--math-fraction={args.math_fraction} must be in [0, 1]")
    if args.layers < 2 or args.hidden < 4 or args.hidden % 2:
        raise BenchError(f"--layers={args.layers} must be >= 2 and --hidden={args.hidden} even and >= 4")
    if not 1 <= args.sae_k <= args.latents:
        raise BenchError(f"--sae-k={args.sae_k} must be in [1, --latents={args.latents}]")
    for o in args.override:
        if "=" not in o:
            raise BenchError(f"--override {o!r}: expected KEY=VALUE")


def _override(overrides: list[str], key: str) -> str | None:
    for o in reversed(overrides):
        k, _, v = o.partition("=")
        if k.lstrip("+~") == key:
            return v
    return None


def _source(work: Path, args) -> tuple[Path, dict, float, bool]:
    name = f"openhermes-n{args.rows}-s{args.seed}-m{args.math_fraction:g}-v{GEN_VERSION}-{args.format}"
    folder = work / "data" / name
    path = folder / f"openhermes2_5.{EXT[args.format]}"
    info = folder / "generation.info"  # not .json: never an input even if the folder is
    if path.exists() and info.exists():
        return path, json.loads(info.read_text()), 0.0, True
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stats = generate_source(path, args.rows, args.format, args.seed, args.math_fraction)
    stats["generate_s"] = round(time.perf_counter() - t0, 3)
    info.write_text(json.dumps(stats, indent=2))
    return path, stats, stats["generate_s"], False


def _target(work: Path, rows: int, seed: int) -> Path:
    path = work / "data" / f"gsm8k-like-n{rows}-s{seed}" / "target.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text("".join(json.dumps(r) + "\n" for r in gsm8k_like(rows, seed)), path)
    return path


def _count_parts(out: Path, manifest: dict) -> dict:
    """Units from the files the run wrote, for manifests without ``units``."""
    prep = [f for f in out.glob("prepared/*/source/*.parquet") if not f.name.endswith(".rejected.parquet")]
    tprep = [f for f in out.glob("prepared/*/target/*.parquet") if not f.name.endswith(".rejected.parquet")]
    store = Path(manifest.get("embedding_store") or out / "embeddings")
    return {"prepare_source": len(prep), "prepare_target": len(tprep),
            "embed_parts": len(list(store.glob("part-*.parquet")))}


def _math_selected(out: Path) -> int | None:
    f = out / "selected.jsonl"
    if not f.exists():
        return None
    return sum(1 for line in f.read_text().splitlines() if json.loads(line).get("category") == "math")


def run(args) -> tuple[dict, str]:
    from ..config import ConfigError, load_config
    from ..pipeline.cli import USER_ERRORS
    from ..pipeline.cli import run as run_job

    _check(args)
    work = Path(args.work_dir) if args.work_dir else DEFAULT_WORK_DIR
    work = work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model_dir = tiny_model(work, args.hidden, args.layers, args.seed)
    hookpoint = _override(args.override, "sae.hookpoint") or f"layers.{args.layers - 2}"
    from ..core.model import parse_hookpoint

    try:
        layer = parse_hookpoint(hookpoint)
    except Exception as e:
        raise BenchError(str(e)) from None
    if layer >= args.layers:
        raise BenchError(f"sae.hookpoint={hookpoint}: the tiny model has {args.layers} blocks")
    sae_dir = random_sae(work, args.hidden, args.latents, args.sae_k, f"layers.{layer}", args.seed)
    setup_s = time.perf_counter() - t0
    src, gen, gen_s, reused = _source(work, args)
    tgt = _target(work, args.target_rows, args.seed)

    runs = work / "runs"
    runs.mkdir(exist_ok=True)
    out = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{args.format}-n{args.rows}"
    overrides = [f"model.path={model_dir}", f"sae.path={sae_dir}", f"sae.hookpoint=layers.{layer}",
                 f"source.paths=[{src}]", f"target.paths=[{tgt}]", f"run.output_dir={out}",
                 f"embed.num_actors={args.actors}", "model.dtype=float32", *args.override]
    try:
        cfg = load_config(overrides)
    except ConfigError as e:
        raise BenchError(f"bad override: {e}") from None

    import ray

    ray_was_up = ray.is_initialized()
    load_start = os.getloadavg()[0]
    rss_before = status_mb("VmRSS")
    reset_peak_rss()
    t1 = time.perf_counter()
    try:
        with CpuMeter() as cpu:
            manifest = run_job(cfg, quiet=True)
    except USER_ERRORS as e:
        raise BenchError(f"pipeline run failed: {e}") from None
    finally:
        if not args.keep and sys.exc_info()[0] is not None:
            shutil.rmtree(out, ignore_errors=True)
    wall = time.perf_counter() - t1
    # the pipeline samples its memory per stage (RSS, and its private / shared-memory parts)
    by_stage = manifest.get("driver_memory_mb") or {}
    driver_rss = max([peak_rss_mb(), *(m["rss"] for m in by_stage.values())])
    driver_private = max((m["anon"] for m in by_stage.values()), default=None)
    load_end = os.getloadavg()[0]

    c = manifest["counts"]["source"]
    tim = manifest["timings_s"]
    thr = manifest.get("throughput", {})
    per_actor = manifest.get("embed_rows_per_actor")
    balance = None
    if per_actor:
        v = [int(x) for x in per_actor.values()]
        balance = {"actors_with_work": sum(1 for x in v if x > 0), "max_rows": max(v), "min_rows": min(v),
                   "max_over_min": (max(v) / min(v)) if min(v) > 0 else None}
    res = {
        "rows": args.rows, "format": args.format, "actors": args.actors,
        "source_file": str(src), "source_bytes": gen.get("bytes"),
        "source_bytes_per_row": gen["bytes"] / args.rows if gen.get("bytes") else None,
        "generation": gen, "generate_s": gen_s, "generation_reused": reused, "setup_s": setup_s,
        "model": {"path": str(model_dir), "hidden": args.hidden, "layers": args.layers, "hookpoint": f"layers.{layer}",
                  "sae_latents": args.latents, "sae_k": args.sae_k},
        "ray_initialised_before": ray_was_up,
        "timings_s": tim, "stage_sum_s": sum(tim.values()), "pipeline_wall_s": wall,
        "unaccounted_s": wall - sum(tim.values()), "pipeline_cpu_s": cpu.seconds,
        "workers_peak_rss_mb": cpu.child_peak_rss_mb, "workers_peak_rss_top": cpu.child_peaks,
        "rows_per_s": c["rows_in"] / wall,
        "counts": {"rows_in": c["rows_in"], "rows_scored": c.get("rows_scored"), "rows_rejected": c["rows_rejected"],
                   "rows_selected": c.get("rows_selected"), "target": manifest["counts"].get("target"),
                   "embedded_now": manifest["counts"].get("embedded_now")},
        "invariant_ok": manifest.get("invariant_rows_in_eq_scored_plus_rejected"),
        "units": manifest.get("units"), "units_from_files": _count_parts(out, manifest),
        "embed_rows_per_actor": per_actor, "embed_balance": balance,
        "throughput": thr,
        "math_rows": gen.get("math_rows"), "math_selected": _math_selected(out),
        "driver_rss_before_mb": rss_before, "driver_peak_rss_mb": driver_rss,
        "driver_peak_private_mb": driver_private, "driver_memory_mb_by_stage": by_stage,
        "load_average_1m_start": load_start, "load_average_1m_end": load_end,
        "run_dir": str(out) if args.keep else None,
    }
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    report = {"params": dict(vars(args)), "work_dir": str(work), "result": res}
    return report, _text(res)


def _text(r: dict) -> str:
    c = r["counts"]
    gen = r["generation"]
    lines = [f"pipeline: {r['rows']:,} OpenHermes-shaped rows ({r['format']}, {r['source_bytes'] / 1e6:,.1f} MB, "
             f"{r['source_bytes_per_row']:,.0f} B/row), {r['actors']} actor(s); tiny Llama h{r['model']['hidden']} "
             f"x{r['model']['layers']} with SmolLM2's tokenizer, random SAE {r['model']['sae_latents']}x"
             f"K{r['model']['sae_k']} at {r['model']['hookpoint']}; load average {r['load_average_1m_start']:.1f} -> "
             f"{r['load_average_1m_end']:.1f}",
             (f"generation: reused ({gen.get('generate_s', 0):.1f} s when first generated)" if r["generation_reused"]
              else f"generation: {r['generate_s']:.1f} s (not part of the pipeline's time)")
             + f"; {gen.get('math_rows')} math rows, {gen.get('system_rows')} with a system turn, "
               f"{gen.get('multi_turn_rows')} multi-turn; model+SAE setup {r['setup_s']:.1f} s"]
    wall = r["pipeline_wall_s"]
    pct = (lambda v: f"{v / wall:.1%}") if wall else (lambda v: "-")
    rows = [{"stage": k, "s": f"{v:.2f}", "share": pct(v)} for k, v in r["timings_s"].items()]
    rows.append({"stage": "(not in timings_s: ray.init, dedupe, ...)", "s": f"{r['unaccounted_s']:.2f}",
                 "share": pct(r["unaccounted_s"])})
    rows.append({"stage": "total wall", "s": f"{wall:.2f}", "share": pct(wall)})
    lines.append(table(rows, [("stage", "stage"), ("s", "wall s"), ("share", "share")]))
    thr = r["throughput"] or {}
    lines.append(f"rows/s end to end {r['rows_per_s']:,.1f}   CPU s (all processes) {r['pipeline_cpu_s']:,.1f}   "
                 f"tokens/s: embed stage {thr.get('tokens_per_s_stage')}, in-actor units {thr.get('tokens_per_s_units')}, "
                 f"forward {thr.get('tokens_per_s_forward')}; real tokens {thr.get('real_tokens')}, padding "
                 f"{thr.get('padding_fraction')}")
    lines.append(f"rows in {fmt(c['rows_in'])}  scored {fmt(c['rows_scored'])}  rejected {fmt(c['rows_rejected'])}  "
                 f"selected {fmt(c['rows_selected'])}  (math {fmt(r['math_selected'])} of {fmt(r['math_rows'])} math rows)  "
                 f"invariant {'ok' if r['invariant_ok'] else 'FAILED'}")
    units = r["units"]
    f = r["units_from_files"]
    lines.append(f"units: manifest {units if units is not None else '- (no manifest[units])'}; files written: "
                 f"prepare source {f['prepare_source']}, target {f['prepare_target']}, embed parts {f['embed_parts']}")
    if r["embed_rows_per_actor"]:
        b = r["embed_balance"]
        lines.append(f"embed rows per actor {r['embed_rows_per_actor']}  (actors with work {b['actors_with_work']} "
                     f"of {r['actors']}, "
                     f"max/min {fmt_ratio(b['max_over_min'])})")
    else:
        lines.append("embed rows per actor: - (no manifest[embed_rows_per_actor])")
    if r.get("driver_memory_mb_by_stage"):
        lines.append("driver peak memory by stage (MB, RSS = private + shared memory + files): " + ", ".join(
            f"{k} {fmt(v['rss'])} = {fmt(v['anon'])} + {fmt(v['shmem'])} + {fmt(v['file'])}"
            for k, v in r["driver_memory_mb_by_stage"].items()))
    lines.append(f"driver peak RSS {fmt(r['driver_peak_rss_mb'])} MB, private {fmt(r['driver_peak_private_mb'])} MB "
                 f"(before the run {fmt(r['driver_rss_before_mb'])} MB; "
                 f"largest Ray process {fmt(r.get('workers_peak_rss_mb'))} MB, sampled every 0.5 s; "
                 f"Ray {'already running' if r['ray_initialised_before'] else 'started inside the run'})")
    if r["run_dir"]:
        lines.append(f"run folder kept: {r['run_dir']}")
    return "\n".join(lines)


def fmt_ratio(x) -> str:
    return "-" if x is None else (f"{x:.2f}" if math.isfinite(x) else "inf")
