"""A tiny Llama *trained* on local text, so its attention is not flat (random-weight models attend uniformly).

Data: the Python standard library's own ``.py`` sources (``sysconfig``'s ``stdlib`` path, files sorted by
name, up to :attr:`TrainSpec.max_chars` characters), tokenized with kvtier's local BPE tokenizer
(``kvtier_bench.models``). Training windows are *quote* rows (a source window, the "document", then ``<|user|>`` +
spans copied from it), *lookup* rows (the document, then ``<|user|> token answer`` triples: is the token in
the document?) and plain source; loss on the quote and answer tokens and a sample of the rest.

What was learned the hard way (2 shared CPU cores): from a random start, a 2-layer model trained for 300-400
steps (10-25 minutes here) on these objectives reaches the "copy any document token" plateau but grows no
content-matching heads (lookup accuracy stayed at chance, and a question quoting the document drew no more
attention to it than unrelated text). So the heads start as duplicate-token heads
(:func:`init_matching_heads`) and everything is then trained for :attr:`TrainSpec.steps` steps. The result
attends to the places a question repeats: the signal an attention-weighted cache policy needs, and the
pattern trained LMs do show (duplicate-token and induction heads).

Deterministic: fixed seeds, a fixed number of steps and ``torch.set_num_threads(TrainSpec.threads)``; the
same machine and library versions give the same weights. About 2-3 minutes of 2 idle cores (the marker
records wall and CPU seconds). Cached like :func:`kvtier_bench.models.build_model`: ``build_model("trained")`` or
``python -m kvtier_bench.train``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvtier_bench import tokenizer as vocab

if TYPE_CHECKING:
    import torch

TRAIN_VERSION = 1
USER_TOKEN = "<|user|>"
YES_TOKEN, NO_TOKEN = "<|assistant|>", "<|end|>"  # lookup answers: the token is / is not in the document


@dataclass(frozen=True)
class TrainSpec:
    num_hidden_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 120
    lr: float = 2e-3
    warmup: int = 20
    quote_fraction: float = 0.4
    lookup_fraction: float = 0.4
    doc_fraction: float = 0.5
    shuffle_fraction: float = 0.5  # quote/lookup rows whose document is a shuffled window
    quote_len: tuple[int, int] = (16, 48)
    lm_fraction: float = 0.05  # share of other positions that carry loss
    max_chars: int = 3_000_000
    threads: int = 2
    seed: int = 4321
    matching_heads: bool = True  # start as duplicate-token heads (see init_matching_heads)
    matching_dims: int = 8  # RoPE frequency pairs (the slowest) used for matching, per head
    matching_gain: float = 8.0


def model_dir_name() -> str:
    return f"llama-trained-v{TRAIN_VERSION}"


def build_trained(cache_dir: str | None = None, spec: TrainSpec | None = None) -> str:
    """Directory of the trained model, training it on first use (cached, built in a temp dir and renamed)."""
    spec = spec or TrainSpec()
    root = Path(cache_dir) if cache_dir is not None else vocab.default_cache_dir()
    final = root / model_dir_name()
    if (final / vocab.MARKER_FILE).is_file():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        os.chmod(staging, 0o755)
        _train_into(staging, spec)
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / vocab.MARKER_FILE).is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return str(final)


# ---- data ------------------------------------------------------------------------------------------------

def corpus_files() -> list[Path]:
    """The stdlib's .py files (no site-packages, no test suites), sorted, so every machine reads the same."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def load_corpus(tokenizer_path: Path, max_chars: int) -> tuple[list[int], dict[str, object]]:
    """Token ids of the concatenated sources and a description (files, chars, sha256) for the marker."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    texts: list[str] = []
    total = 0
    digest = hashlib.sha256()
    files = corpus_files()
    used = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        digest.update(text.encode())
        total += len(text)
        used += 1
        if total >= max_chars:
            break
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
    info = {"source": str(Path(sysconfig.get_paths()["stdlib"])), "files": used, "chars": total,
            "tokens": len(ids), "sha256": digest.hexdigest()}
    return ids, info


def _quote_row(rng: random.Random, doc: list[int], spec: TrainSpec, user: int) -> tuple[list[int], list[bool]]:
    """Document, then ``<|user|>`` + a span copied from it, repeated; the quote tokens are the targets."""
    row, target = list(doc), [False] * len(doc)
    while len(row) < spec.seq_len:
        qlen = rng.randint(*spec.quote_len)
        at = rng.randrange(len(doc) - qlen)
        row += [user] + doc[at:at + qlen]
        target += [False] + [True] * qlen
    return row, target


def _lookup_row(rng: random.Random, doc: list[int], stream: list[int], spec: TrainSpec,
                marks: tuple[int, int, int]) -> tuple[list[int], list[bool]]:
    """Document, then ``<|user|> t answer`` triples: is token ``t`` in the document (half of them are)?"""
    user, yes, no = marks
    present = set(doc)
    row, target = list(doc), [False] * len(doc)
    while len(row) < spec.seq_len:
        token = doc[rng.randrange(len(doc))]
        if rng.random() < 0.5:
            for _ in range(8):
                token = stream[rng.randrange(len(stream))]
                if token not in present:
                    break
        row += [user, token, yes if token in present else no]
        target += [False, False, True]
    return row, target


def make_batch(rng: random.Random, stream: list[int], spec: TrainSpec, bos: int,
               marks: tuple[int, int, int]) -> tuple[list[list[int]], list[list[bool]]]:
    """``batch_size`` windows of ``seq_len`` tokens and which positions carry loss.

    Rows are *quote* rows (a document, ``doc_fraction`` of the window, then spans copied from it: predicting
    them needs looking back at the match), *lookup* rows (the document, then single tokens, each answered
    with whether it occurs in the document: needs attention to matching tokens) or plain source text.
    Target positions of quotes and lookups always carry loss; other positions a ``lm_fraction`` sample.
    """
    rows: list[list[int]] = []
    masks: list[list[bool]] = []
    for _ in range(spec.batch_size):
        kind = rng.random()
        if kind < spec.quote_fraction + spec.lookup_fraction:
            doc_len = int(spec.seq_len * spec.doc_fraction)
            start = rng.randrange(len(stream) - doc_len)
            doc = stream[start:start + doc_len]
            if rng.random() < spec.shuffle_fraction:
                rng.shuffle(doc)  # no bigram shortcut: only looking back at the match predicts the quote
            if kind < spec.quote_fraction:
                body, target = _quote_row(rng, doc, spec, marks[0])
            else:
                body, target = _lookup_row(rng, doc, stream, spec, marks)
        else:
            start = rng.randrange(len(stream) - spec.seq_len)
            body, target = stream[start:start + spec.seq_len - 1], [False] * (spec.seq_len - 1)
        row, target = ([bos] + body)[:spec.seq_len], ([False] + target)[:spec.seq_len]
        rows.append(row)
        masks.append([t or rng.random() < spec.lm_fraction for t in target[1:]])  # position p predicts p+1
    return rows, masks


# ---- training --------------------------------------------------------------------------------------------

def _llama_config(spec: TrainSpec, ids: dict[str, int]) -> object:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab.VOCAB_SIZE, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.hidden_size // spec.num_attention_heads, max_position_embeddings=8192,
        hidden_act="silu", rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=False,
        bos_token_id=ids[vocab.BOS_TOKEN], eos_token_id=ids[vocab.EOS_TOKEN], pad_token_id=ids[vocab.PAD_TOKEN],
    )


def init_matching_heads(model: torch.nn.Module, spec: TrainSpec) -> None:
    """Initialise every layer's heads as duplicate-token heads: queries and keys share a random orthonormal
    projection of the (normalised) token embedding, placed in the ``matching_dims`` slowest RoPE frequency
    pairs of each head, so a token attends to earlier copies of itself at any distance up to a few thousand
    positions. Trained LMs grow such heads (GPT-2's "duplicate token heads"); a few CPU minutes of training
    from a random start do not, so the training starts from them. The other dimensions keep their random
    initialisation and every weight is trained afterwards."""
    import torch

    hd = spec.hidden_size // spec.num_attention_heads
    m = spec.matching_dims
    slow = list(range(hd // 2 - m, hd // 2)) + list(range(hd - m, hd))  # rotate_half pairs (i, i + hd/2)
    group = spec.num_attention_heads // spec.num_key_value_heads
    with torch.no_grad():
        for layer in model.model.layers:  # type: ignore[union-attr]
            attn = layer.self_attn
            for g in range(spec.num_key_value_heads):
                proj = torch.linalg.qr(torch.randn(spec.hidden_size, 2 * m))[0].T  # orthonormal rows [2m, hidden]
                attn.k_proj.weight[[g * hd + i for i in slow]] = proj
                for h in range(g * group, (g + 1) * group):
                    attn.q_proj.weight[[h * hd + i for i in slow]] = spec.matching_gain * proj


def _lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(spec: TrainSpec, target: Path, log_every: int = 25) -> dict[str, object]:
    """Train and save into ``target`` (tokenizer, config, bf16 weights). Returns the training report."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    ids = vocab.save_tokenizer(target, vocab.VOCAB_SIZE, 8192)
    stream, corpus = load_corpus(target / "tokenizer.json", spec.max_chars)
    user = ids[USER_TOKEN]
    marks = (user, ids[YES_TOKEN], ids[NO_TOKEN])
    torch.set_num_threads(spec.threads)
    rng = random.Random(spec.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(_llama_config(spec, ids))  # type: ignore[arg-type]
        if spec.matching_heads:
            init_matching_heads(model, spec)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.01)
    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec)
        rows, masks = make_batch(rng, stream, spec, ids[vocab.BOS_TOKEN], marks)
        batch, mask = torch.tensor(rows), torch.tensor(masks)
        hidden = model.model(input_ids=batch).last_hidden_state[:, :-1][mask]  # lm_head only where loss counts
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden).float(), batch[:, 1:][mask])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == spec.steps - 1):
            print(f"step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    model.eval()
    report = {"train_seconds": round(elapsed, 1), "train_cpu_seconds": round(cpu, 1), "first_loss": round(losses[0], 3),
              "final_loss": round(sum(losses[-10:]) / min(10, len(losses)), 3),
              "attention_eval": attention_eval(model, stream, chat_tokens(target / "tokenizer.json"), spec,
                                                 ids[vocab.BOS_TOKEN], user), "corpus": corpus}
    model.to(dtype=torch.bfloat16).save_pretrained(str(target))  # type: ignore[call-arg]
    GenerationConfig(bos_token_id=ids[vocab.BOS_TOKEN], eos_token_id=ids[vocab.EOS_TOKEN],
                     pad_token_id=ids[vocab.PAD_TOKEN]).save_pretrained(str(target))
    return report


def attention_eval(model: torch.nn.Module, stream: list[int], chat: list[int], spec: TrainSpec, bos: int,
                   user: int) -> dict[str, float]:
    """What the benchmark relies on: the share of the last 16 queries' attention (mean over layers and heads)
    that lands on a 4-block document (BOS excluded) when the 48-token question quotes it, is other source
    code, or is English chit-chat; and the loss on the question tokens (copying shows as a lower loss)."""
    import torch

    rng = random.Random(spec.seed + 1)
    out: dict[str, list[float]] = {}
    model.set_attn_implementation("eager")  # type: ignore[operator]
    with torch.no_grad():
        for _ in range(8):
            qlen, doc_len = 48, 4 * 128 - 1
            start = rng.randrange(len(stream) - doc_len)
            doc = stream[start:start + doc_len]
            at, other, talk = (rng.randrange(doc_len - qlen), rng.randrange(len(stream) - qlen),
                               rng.randrange(len(chat) - qlen))
            for name, quote in (("quoted", doc[at:at + qlen]), ("code", stream[other:other + qlen]),
                                ("chat", chat[talk:talk + qlen])):
                row = torch.tensor([[bos] + doc + [user] + quote])
                result = model(input_ids=row, output_attentions=True)
                logits = result.logits[0, -qlen - 1:-1].float()
                loss = float(torch.nn.functional.cross_entropy(logits, row[0, -qlen:]))
                share = [float(a[0, :, -16:, 1:doc_len + 1].sum(-1).mean()) for a in result.attentions]
                out.setdefault(f"loss_{name}", []).append(loss)
                out.setdefault(f"doc_share_{name}", []).append(sum(share) / len(share))
    model.set_attn_implementation("sdpa")  # type: ignore[operator]
    return {name: round(sum(v) / len(v), 3) for name, v in sorted(out.items())}


def chat_tokens(tokenizer_path: Path) -> list[int]:
    """English chit-chat (kvtier_bench.models' synthetic corpus) as token ids: text unrelated to source code."""
    from itertools import islice

    from tokenizers import Tokenizer

    text = " ".join(islice(vocab.corpus(seed=vocab.SEED + 1), 4000))
    return Tokenizer.from_file(str(tokenizer_path)).encode(text, add_special_tokens=False).ids


def _train_into(target: Path, spec: TrainSpec) -> None:
    report = train(spec, target)
    for path in target.iterdir():
        path.chmod(0o644)
    marker = {"size": "trained", "version": TRAIN_VERSION, "spec": asdict(spec), "report": report}
    (target / vocab.MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtier_bench.train", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--steps", type=int, default=None, help="override the step count (changes the weights)")
    args = parser.parse_args(argv)
    spec = TrainSpec() if args.steps is None else TrainSpec(steps=args.steps)
    print(build_trained(args.cache_dir, spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
