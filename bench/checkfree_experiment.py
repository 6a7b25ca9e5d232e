"""CheckFree experiment: lose a pipeline stage mid-training and compare how each recovery converges.

    python bench/checkfree_experiment.py [--steps 300] [--fail-at 150] [--stages 6] [--seed 0]

A small LLaMA-style model (RMSNorm, rotary positions, SwiGLU MLP, causal attention) is cut into
`--stages` pipeline stages of one identical block each; the first stage also holds the token
embedding, the last the final norm and the de-embedding. The pipeline runs in this one process,
stage after stage, over micro-batches of a generated text (words from a random bigram grammar),
with AdamW per stage, a global gradient clip and a warm-up/cosine schedule.

After `--fail-at` steps the middle stage (`--lose`) is lost, and training continues from there
in one branch per recovery:

  (a) no failure                    (b) CheckFree: gradient-norm weighted average of the neighbours
  (c) copy of the previous stage    (d) random re-initialisation
  (e) restore from an ftd snapshot: a real `ftd daemon` process, one Snapshotter per stage that
      snapshots every step, and Snapshotter.restore() into a freshly built stage; it must end
      bit for bit equal to (a)

(b)-(d) restart the stage's optimizer with its learning rate raised by `--lr-scale`. CheckFree+:
a second pipeline trains with the swap schedule (on odd micro-batches the two first and the two
last stages run swapped) and loses its first or its last stage, rebuilt as a copy of the neighbour
plus the (de)embedding copy the neighbour keeps; for contrast the same rebuild of the first stage
of the pipeline trained without swapping. Results go to bench/results/checkfree-<date>.{md,png,json}.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import ftd  # noqa: E402
from ftd.demo.model import warmup_cosine  # noqa: E402
from ftd.demo.procs import DaemonProcess, ftd_env  # noqa: E402
from ftd.recovery import (  # noqa: E402
    GradNormTracker,
    SwapSchedule,
    edge_extras,
    edge_neighbour,
    neighbours,
    rebuild_edge,
    rebuild_intermediate,
    restart_optimizer,
)

TOLERANCE = 0.02  # "recovered": smoothed loss within 2% of the reference run's


# ---- data: a generated language -------------------------------------------------------------------


def make_corpus(seed: int, chars: int = 400_000, words: int = 400, successors: int = 8) -> tuple[torch.Tensor, int]:
    """Character ids of a text of random words, each followed by one of a few likely successors."""
    rng = random.Random(seed)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    vocab = sorted({"".join(rng.choice(consonants) + rng.choice(vowels) + rng.choice(["", rng.choice(consonants)])
                            for _ in range(rng.randint(1, 3))) for _ in range(words)})
    zipf = [1.0 / (k + 1) for k in range(successors)]
    follow = {w: rng.sample(vocab, successors) for w in vocab}
    out, word = [], rng.choice(vocab)
    while sum(map(len, out)) < chars:
        length = rng.randint(4, 12)
        for _ in range(length):
            out.append(word + " ")
            word = rng.choices(follow[word], zipf)[0]
        out[-1] = out[-1][:-1] + ". "
        word = rng.choice(vocab)
    text = "".join(out)[:chars]
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), len(alphabet)


def micro_batch(corpus: torch.Tensor, step: int, micro: int, size: int, seq: int, seed: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic (inputs, targets) of micro-batch `micro` of `step`."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + micro)
    starts = torch.randint(0, len(corpus) - seq - 1, (size, 1), generator=g)
    seqs = corpus[starts + torch.arange(seq + 1)]
    return seqs[:, :-1], seqs[:, 1:]


# ---- the model ---------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned gain."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(seq: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, (seq, head_dim / 2) each."""
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of (batch, heads, seq, head_dim) queries or keys."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    """Pre-norm transformer block: causal attention with rotary positions, SwiGLU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        hidden = 64 * math.ceil(8 * dim / 3 / 64)
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        cos, sin = rope[0][:t], rope[1][:t]
        att = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, is_causal=True)
        x = x + self.out(att.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Stage(nn.Module):
    """One pipeline stage: a block, plus the embedding (first stage) or final norm and head (last)."""

    def __init__(self, index: int, num_stages: int, vocab: int, dim: int, heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim) if index == 0 else None
        self.block = Block(dim, heads)
        last = index == num_stages - 1
        self.norm = RMSNorm(dim) if last else None
        self.head = nn.Linear(dim, vocab, bias=False) if last else None


# ---- the pipeline, simulated in one process --------------------------------------------------------------


@dataclass
class Config:
    """Shape of the model, the data and the run."""

    stages: int
    vocab: int
    dim: int
    heads: int
    seq: int
    micro_size: int
    micros: int
    lr: float
    steps: int
    seed: int
    swap: bool = False


@dataclass
class Pipeline:
    """Stages with their optimizers, schedulers and gradient-norm trackers; kept edge copies (CheckFree+)."""

    cfg: Config
    stages: list[Stage]
    optims: list[torch.optim.Optimizer]
    scheds: list[torch.optim.lr_scheduler.LRScheduler]
    trackers: list[GradNormTracker]
    rope: tuple[torch.Tensor, torch.Tensor]
    kept: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg: Config) -> Pipeline:
        torch.manual_seed(cfg.seed)
        stages = [Stage(i, cfg.stages, cfg.vocab, cfg.dim, cfg.heads) for i in range(cfg.stages)]
        optims = [make_optimizer(s, cfg) for s in stages]
        pipe = cls(cfg, stages, optims, [make_scheduler(o, cfg, 0) for o in optims],
                   [GradNormTracker.attach(o) for o in optims], rotary_tables(cfg.seq, cfg.dim // cfg.heads))
        pipe.refresh_edge_copies()
        return pipe

    def forward(self, tokens: torch.Tensor, order: list[int]) -> torch.Tensor:
        first, last = self.stages[0], self.stages[-1]
        x = first.embed(tokens)
        for index in order:
            x = self.stages[index].block(x, self.rope)
        return last.head(last.norm(x))

    def step(self, step: int, corpus: torch.Tensor) -> float:
        """One training step over `micros` micro-batches; returns the mean loss."""
        cfg, total = self.cfg, 0.0
        schedule = SwapSchedule(cfg.stages) if cfg.swap else None
        for m in range(cfg.micros):
            x, y = micro_batch(corpus, step, m, cfg.micro_size, cfg.seq, cfg.seed)
            order = schedule.order(step * cfg.micros + m) if schedule else list(range(cfg.stages))
            logits = self.forward(x, order)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) / cfg.micros
            loss.backward()
            total += loss.item()
        nn.utils.clip_grad_norm_([p for s in self.stages for p in s.parameters()], 1.0)
        for opt, sched in zip(self.optims, self.scheds):
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        self.refresh_edge_copies()
        return total

    def refresh_edge_copies(self) -> None:
        """Stage 1 keeps the embedding, stage n-2 the final norm and head (CheckFree+)."""
        n = self.cfg.stages
        for edge in (0, n - 1):
            neighbour = self.stages[edge_neighbour(edge, n)]
            self.kept[edge] = edge_extras(self.stages[edge].state_dict(), neighbour.state_dict())

    def save(self) -> dict:
        """Copies of everything a branch starts from: weights, optimizer and scheduler state, norms, edge copies."""
        return {"stages": [{k: v.clone() for k, v in s.state_dict().items()} for s in self.stages],
                "optims": [copy.deepcopy(o.state_dict()) for o in self.optims],
                "scheds": [s.state_dict() for s in self.scheds],
                "norms": [t.norm for t in self.trackers], "kept": copy.deepcopy(self.kept)}

    @classmethod
    def load(cls, cfg: Config, saved: dict) -> Pipeline:
        """A new pipeline in the state `save()` captured."""
        pipe = cls.build(cfg)
        for i in range(cfg.stages):
            pipe.stages[i].load_state_dict(saved["stages"][i])
            pipe.optims[i].load_state_dict(saved["optims"][i])
            pipe.scheds[i].load_state_dict(saved["scheds"][i])
            pipe.trackers[i].norm = saved["norms"][i]
        pipe.kept = copy.deepcopy(saved["kept"])
        return pipe

    def replace_stage(self, index: int, step: int, seed: int) -> None:
        """The lost stage's replacement: a freshly initialised module with a fresh optimizer and schedule."""
        torch.manual_seed(seed)
        self.trackers[index].close()
        stage = Stage(index, self.cfg.stages, self.cfg.vocab, self.cfg.dim, self.cfg.heads)
        self.stages[index] = stage
        self.optims[index] = make_optimizer(stage, self.cfg)
        self.scheds[index] = make_scheduler(self.optims[index], self.cfg, step)
        self.trackers[index] = GradNormTracker.attach(self.optims[index])


def make_optimizer(stage: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW as LLaMA-style models use it."""
    return torch.optim.AdamW(stage.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)


def make_scheduler(opt: torch.optim.Optimizer, cfg: Config, step: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Warm-up/cosine, positioned at `step` (a replacement stage joins at the current step)."""
    sched = warmup_cosine(opt, warmup=max(1, cfg.steps // 20), total=cfg.steps)
    if step:
        sched.last_epoch = step
        for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(step)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
    return sched


# ---- the recoveries -----------------------------------------------------------------------------------


def recover(pipe: Pipeline, variant: str, lost: int, step: int, lr_scale: float) -> None:
    """Lose stage `lost` after `step` steps and rebuild it as `variant` says (not 'snapshot')."""
    n = pipe.cfg.stages
    old = [s.state_dict() for s in pipe.stages]  # what the survivors can send (the lost entry is not used)
    norms = [t.norm for t in pipe.trackers]
    pipe.replace_stage(lost, step, seed=pipe.cfg.seed + 1000 + lost)
    keys = pipe.stages[lost].state_dict().keys()
    if variant == "checkfree":
        prev, nxt = neighbours(lost, n)
        state = rebuild_intermediate(old[prev], old[nxt], norms[prev], norms[nxt], keys=keys)
    elif variant == "copy":
        state = {k: old[lost - 1][k].clone() for k in keys}
    elif variant == "edge-copy":
        state = rebuild_edge(old[edge_neighbour(lost, n)], pipe.kept[lost], keys=keys)
    elif variant == "random":
        state = None
    else:
        raise ValueError(f"unknown variant {variant!r}")
    if state is not None:
        pipe.stages[lost].load_state_dict(state)
    restart_optimizer(pipe.optims[lost], lr_scale, pipe.scheds[lost])


def restore_from_ftd(pipe: Pipeline, lost: int, step: int, settings: dict[str, str]) -> float:
    """Rebuild stage `lost` from the daemon's snapshot; returns the restore's seconds."""
    pipe.replace_stage(lost, 0, seed=pipe.cfg.seed + 2000 + lost)
    t0 = time.perf_counter()
    with ftd.Snapshotter(pipe.stages[lost], pipe.optims[lost], scheduler=pipe.scheds[lost], rank=lost,
                         world_size=pipe.cfg.stages, **settings) as snap:
        restored = snap.restore(restore_rng=False)
    if restored != step:
        raise RuntimeError(f"ftd restored step {restored}, expected {step}")
    return time.perf_counter() - t0


# ---- the experiment ---------------------------------------------------------------------------------


def train(pipe: Pipeline, corpus: torch.Tensor, start: int, end: int, label: str,
          snaps: list[ftd.Snapshotter] | None = None) -> list[float]:
    """Steps `start`..`end`-1, snapshotting every stage after each step when `snaps` are given; the losses."""
    losses, t0 = [], time.perf_counter()
    for step in range(start, end):
        losses.append(pipe.step(step, corpus))
        for snap in snaps or []:
            snap.snapshot(step + 1)
    print(f"  {label:<34} steps {start}-{end - 1}: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return losses


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def steps_to_recover(after: list[float], reference: list[float], window: int) -> int | None:
    """Steps after the failure until the smoothed loss is within TOLERANCE of the reference's and stays
    there for `window` steps (or to the end); None when it never does."""
    mine, ref = smoothed(after, window), smoothed(reference, window)
    inside = [m <= (1 + TOLERANCE) * r for m, r in zip(mine, ref)]
    for k in range(len(inside)):
        if all(inside[k:k + window]):
            return k
    return None


def run(args: argparse.Namespace) -> dict:
    """Every branch of the experiment: their loss curves, whether (e) is bit-exact, the restore time."""
    torch.set_num_threads(args.threads)
    corpus, vocab = make_corpus(args.seed)
    n, fail, lost = args.stages, args.fail_at, args.lose if args.lose is not None else args.stages // 2
    neighbours(lost, n)  # an intermediate stage, or a clear error
    cfg = Config(n, vocab, args.dim, args.heads, args.seq, args.batch // args.micros, args.micros, args.lr,
                 args.steps, args.seed)
    curves: dict[str, list[float]] = {}
    work = Path(tempfile.mkdtemp(prefix="ftd-checkfree-"))
    env = ftd_env(work, "checkfree")
    settings = {"job": env["FTD_JOB"], "socket": env["FTD_SOCKET"], "log_level": "WARNING"}
    daemon = DaemonProcess(env, work / "daemon.log").start()
    try:
        print(f"pipeline of {n} stages, trained {fail} steps with an ftd snapshot of every stage each step")
        pipe = Pipeline.build(cfg)
        snaps = [ftd.Snapshotter(pipe.stages[i], pipe.optims[i], scheduler=pipe.scheds[i], rank=i, world_size=n,
                                 **settings) for i in range(n)]
        before = train(pipe, corpus, 0, fail, "trunk (snapshot every step)", snaps)
        for snap in snaps:
            snap.wait()
            snap.close()
        sealed = [s.stats.sealed for s in snaps]
        saved = pipe.save()
        print(f"stage {lost} lost after step {fail} (snapshots sealed per stage: {sealed})")
        branch = Pipeline.load(cfg, saved)
        restore_s = restore_from_ftd(branch, lost, fail, settings)
        curves["(e) ftd snapshot"] = before + train(branch, corpus, fail, args.steps, "(e) restore from ftd")
        final_e = [s.state_dict() for s in branch.stages]
        for label, variant in (("(b) CheckFree", "checkfree"), ("(c) copy of neighbour", "copy"),
                               ("(d) random re-init", "random")):
            branch = Pipeline.load(cfg, saved)
            recover(branch, variant, lost, fail, args.lr_scale)
            curves[label] = before + train(branch, corpus, fail, args.steps, label)
        branch = Pipeline.load(cfg, saved)
        recover(branch, "edge-copy", 0, fail, args.lr_scale)
        curves["(i) first stage copied, no swap training"] = before + train(
            branch, corpus, fail, args.steps, "(i) first copied, no swap")
        curves["(a) no failure"] = before + train(pipe, corpus, fail, args.steps, "(a) no failure")
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    final_a = [s.state_dict() for s in pipe.stages]
    exact = curves["(e) ftd snapshot"] == curves["(a) no failure"] and all(
        sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) for sa, sb in zip(final_e, final_a))

    print("CheckFree+: the same pipeline trained with the swap schedule")
    swap_cfg = dataclasses.replace(cfg, swap=True)
    pipe = Pipeline.build(swap_cfg)
    before = train(pipe, corpus, 0, fail, "trunk with swaps")
    saved = pipe.save()
    for label, edge in (("(g) CheckFree+ first stage", 0), ("(h) CheckFree+ last stage", n - 1)):
        branch = Pipeline.load(swap_cfg, saved)
        recover(branch, "edge-copy", edge, fail, args.lr_scale)
        curves[label] = before + train(branch, corpus, fail, args.steps, label)
    curves["(f) no failure, swap training"] = before + train(pipe, corpus, fail, args.steps, "(f) no failure, swaps")
    return {"curves": curves, "exact": exact, "restore_s": restore_s, "lost": lost}


# ---- report ---------------------------------------------------------------------------------------------


def reference_of(label: str) -> str:
    """The no-failure run a variant is compared with (the swap-trained one for CheckFree+)."""
    return "(f) no failure, swap training" if label[:3] in ("(g)", "(h)", "(f)") else "(a) no failure"


def table(result: dict, args: argparse.Namespace) -> list[str]:
    """The markdown table of losses around the failure and steps to recover."""
    curves, fail, w = result["curves"], args.fail_at, args.window
    probes = [k for k in (10, 50) if fail + k < args.steps]
    head = ["variant", "reference", f"loss @{fail - 1} (before)", f"loss @{fail} (jump)", "jump vs reference",
            *[f"@{fail}+{k} (smoothed)" for k in probes], "final (smoothed)", "steps to recover"]
    rows = [head, ["---"] * len(head)]
    order = ["(a) no failure", "(b) CheckFree", "(c) copy of neighbour", "(d) random re-init", "(e) ftd snapshot",
             "(f) no failure, swap training", "(g) CheckFree+ first stage", "(h) CheckFree+ last stage",
             "(i) first stage copied, no swap training"]
    for label in order:
        ref = curves[reference_of(label)]
        mine = curves[label]
        after, ref_after = mine[fail:], ref[fail:]
        sm = smoothed(after, w)
        if label == reference_of(label):
            recovered = "-"
        else:
            k = steps_to_recover(after, ref_after, w)
            gap = sm[-1] / smoothed(ref_after, w)[-1] - 1
            recovered = f"{k}" if k is not None else f"not within {args.steps - fail} (gap {gap:+.1%})"
            if label.startswith("(e)"):
                recovered += " (bit-exact with (a))" if result["exact"] else " (NOT bit-exact)"
        rows.append([label, reference_of(label)[:3], f"{mine[fail - 1]:.4f}", f"{after[0]:.4f}",
                     f"{after[0] / ref_after[0] - 1:+.1%}",
                     *[f"{sm[k]:.4f}" for k in probes], f"{sm[-1]:.4f}", recovered])
    return ["| " + " | ".join(r) + " |" for r in rows]


def plot(result: dict, args: argparse.Namespace, path: Path) -> None:
    """Smoothed loss curves from shortly before the failure: middle stage left, edge stages right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, w, fail = result["curves"], args.window, args.fail_at
    start = max(0, fail - 30)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    labels = sorted(curves)  # "(a) ..." to "(i) ...": (e) is drawn over (a), dashed
    groups = ([k for k in labels if k[:3] in ("(a)", "(b)", "(c)", "(d)", "(e)")],
              [k for k in labels if k[:3] in ("(a)", "(f)", "(g)", "(h)", "(i)")])
    titles = (f"stage {result['lost']} of {args.stages} lost after step {fail}", "CheckFree+: first/last stage lost")
    colors = dict(zip(labels, plt.get_cmap("tab10").colors))
    for ax, group, title in zip(axes, groups, titles):
        for label in group:
            curve = curves[label]
            # smoothing restarts at the failure, as in the table, so the jump is not smeared
            line = smoothed(curve[:fail], w) + smoothed(curve[fail:], w)
            style = {"linestyle": (0, (4, 3))} if label.startswith("(e)") else {}
            ax.plot(range(start, args.steps), line[start:], label=label, color=colors[label], **style)
        ax.axvline(fail, color="grey", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"training loss (trailing mean of {w})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict, args: argparse.Namespace, lines: list[str], seconds: float, date: str) -> str:
    """The report: setup, table, exactness of the ftd restore, the plot."""
    command = (f"python bench/checkfree_experiment.py --steps {args.steps} --fail-at {args.fail_at} "
               f"--stages {args.stages} --seed {args.seed} --lr-scale {args.lr_scale}")
    setup = (f"`{command}`: {args.stages} stages (dim {args.dim}, 1 block each), seq {args.seq}, batch {args.batch} "
             f"in {args.micros} micro-batches, AdamW lr {args.lr}, warm-up/cosine, global gradient clip 1.0; stage "
             f"{result['lost']} lost after step {args.fail_at}. Losses are each step's training loss; smoothed = "
             f"trailing mean of {args.window} steps, restarted at the failure. Steps to recover: steps after the "
             f"failure until the smoothed loss is within {TOLERANCE:.0%} of the reference's and stays there for "
             f"{args.window} steps. Runtime {seconds:.0f} s.")
    exact = (f"ftd restore of the lost stage took {result['restore_s'] * 1e3:.0f} ms; (e) bit-exact with (a) "
             f"(every loss and every final parameter): **{result['exact']}**.")
    return "\n".join([f"# CheckFree experiment, {date}", "", setup, "", *lines, "", exact, "",
                      f"![loss curves](checkfree-{date}.png)", ""])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--fail-at", type=int, default=150, help="the stage is lost after this many steps")
    p.add_argument("--stages", type=int, default=6)
    p.add_argument("--lose", type=int, default=None, help="intermediate stage to lose (default: stages // 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--micros", type=int, default=2, help="micro-batches per step (swaps alternate between them)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-scale", type=float, default=1.1, help="learning-rate raise of a rebuilt stage")
    p.add_argument("--window", type=int, default=10, help="smoothing window (steps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if not 0 < args.fail_at < args.steps or args.batch % args.micros or args.stages < 4:
        p.error("need 0 < --fail-at < --steps, --batch divisible by --micros, and --stages >= 4")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = run(args)
    seconds = time.perf_counter() - t0
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = table(result, args)
    print("\n".join(lines))
    print(f"ftd restore of the lost stage: {result['restore_s'] * 1e3:.0f} ms; bit-exact with (a): {result['exact']}; "
          f"total {seconds:.0f} s")
    doc = markdown(result, args, lines, seconds, date)
    (out / f"checkfree-{date}.md").write_text(doc)
    (out / f"checkfree-{date}.json").write_text(json.dumps(
        {"args": vars(args), "seconds": seconds, "exact": result["exact"], "restore_s": result["restore_s"],
         "curves": result["curves"]}))
    try:
        plot(result, args, out / f"checkfree-{date}.png")
    except ImportError:
        print("matplotlib is missing (pip install '.[bench]'): no plot")
    print(f"wrote {out}/checkfree-{date}.md, .json, .png")
    return 0 if result["exact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
