"""A curious server's audit: attacks on what one client sends in a round, in each privacy mode,
next to the new-task accuracy the mode keeps.

    python -m bench.privacy --out bench-results/privacy                # reported seeds
    python -m bench.privacy --seeds 0 --out /tmp/privacy-dev           # development

The client is the benchmark's: each of the MNIST-5k federation's five experts with its answers on
its own disjoint shard of the query pool (about 400 queries), trained by the client's own round
(``client_sdk.clientapp.local_training.run_round``: exactly what a SuperNode sends). The server
knows what it sent, the round plan, and everything in the reply. Each client's round starts from
two points of a run: the first round's random weights, and a trained bank (the central bank of the
same experts, standing in for a federation's late rounds). Attacks:

- *activation mean*: the per-channel mean of the first hidden layer's activations on the
  client's training queries, read off the batch-norm running mean of the reply (its momentum
  unrolled over the round's steps, which the server knows from the example count); relative
  error against the truth computed with the returned weights. Layer normalization leaves nothing
  to read.
- *membership*: are given inputs among the client's training queries (members) or its held-out
  ones (non-members, same distribution)? The attacker scores each input by how much the round
  moved the bank's prediction over the client's declared labels (KL from before to after), and
  by how much it moved its features; AUC of the better score (0.5: nothing learnt).
- *label prior*: the imitation head's per-label biases against the frequency of each label among
  the expert's answers on the client's queries (Pearson correlation of bias and log frequency).

Modes: plain federation with batch norm and with layer norm (a federation's default), each
attacked on what the server receives from one client; and, with layer norm, on what every
organization receives after the round (the combination of the five clients' updates), plain and
under client-level DP at epsilon 8, 4 and 1 (the noise the accountant calibrates over 40 rounds;
the server's own view under DP is the plain one). Secure aggregation is not in this release
(docs/threat-model.md). Accuracy: the
central bank of each mode on the benchmark's new 5-way tasks (paired, same episodes). Writes
results.md and results.json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from bench.federated import score, shard_rows, summarize
from bench.federations import DEFAULT_RECIPES
from bench.run import REPORT_SEEDS, SHOTS, build_world, episode_tasks, log
from client_sdk.clientapp.local_training import (
    LocalExpert,
    client_seed,
    local_triples,
    run_round,
)
from protofuse.families import family
from protofuse.families.discriminative import config_for, load_shared, shared_arrays
from protofuse.model.networks import as_channels_first
from protofuse.protocol.federation import RoundPlan
from protofuse.settings import FederationSettings, ModelSettings, TrainingSettings

MODES = {"plain, batch norm": "batch", "plain, layer norm": "layer"}
# What every organization receives each round (the combination), with layer norm, a federation's
# default: plain, and under client-level DP at each budget over the benchmark's 40 rounds.
BROADCAST_NORM = "layer"
DP_EPSILONS = (8.0, 4.0, 1.0)
DP_ROUNDS = 40
PLAIN_BROADCAST = "everyone's view: the combination, plain"


def dp_view(epsilon: float) -> str:
    return f"everyone's view: the combination, DP epsilon {epsilon:g}"


def broadcasts(
    sent: dict[str, np.ndarray],
    replies: list,
    experts: list[LocalExpert],
    vocabulary: tuple[str, ...],
    seed: int,
) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The round's combination of every client's update, as the server broadcasts it: the
    row-wise mean (plain), and the DP combination (server/fusion/dp.py) with the noise the
    accountant calibrates to each budget of ``DP_EPSILONS`` over ``DP_ROUNDS`` rounds."""
    from protofuse.privacy import plan_dp
    from protofuse.settings import PrivacySettings
    from protofuse_server.fusion import dp
    from protofuse_server.fusion.defences import deltas_of

    deltas = deltas_of([r.shared for r in replies], sent)
    col = {c: i for i, c in enumerate(vocabulary)}
    covers = np.zeros((len(experts), len(vocabulary)))
    for i, e in enumerate(experts):
        covers[i, [col[c] for c in e.labels]] = 1.0
    coverage = covers.sum(0)
    rng = np.random.default_rng(seed)

    def applied(step: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: (v + step[k]).astype(v.dtype) if k in step else v for k, v in sent.items()}

    n = len(experts)
    out = [
        (PLAIN_BROADCAST, applied(dp.noisy_mean(deltas, covers, coverage, n, 1e30, 0.0, True, rng)))
    ]
    for eps in DP_EPSILONS:
        plan = plan_dp(PrivacySettings(mode="dp", epsilon=eps), DP_ROUNDS)
        step = dp.noisy_mean(
            deltas, covers, coverage, n, plan.clip, plan.noise_multiplier, True, rng
        )
        out.append((dp_view(eps), applied(step)))
    return out


MOMENTUM = 0.1  # torch's batch-norm default: the server knows the architecture


def auc(members: np.ndarray, others: np.ndarray) -> float:
    """Probability that a member scores above a non-member (ties count half)."""
    diff = members[:, None] - others[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def better_auc(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> float:
    """The attacker's best AUC over its scores, each read in either direction (so at least 0.5
    even when nothing is learnt: the null split measures that floor)."""
    return max(max(auc(x, y), auc(-x, -y)) for x, y in zip(a, b, strict=True))


def first_layer(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The first hidden layer's pre-normalization activations, one row per channel's mean input:
    (n, C) for an MLP, (n, C, H, W) for conv maps."""
    enc = model.encoder
    if hasattr(enc, "conv"):
        return enc.conv[0](as_channels_first(x, enc.image_shape))
    return enc.mlp.net[0](x)


def channel_mean(a: torch.Tensor) -> np.ndarray:
    dims = [0, 2, 3] if a.dim() == 4 else [0]
    return a.mean(dims).detach().numpy()


def running_mean_name(arrays: dict[str, np.ndarray]) -> str | None:
    return next((k for k in arrays if k.endswith("running_mean")), None)


def recover_activation_mean(
    sent: dict[str, np.ndarray], got: dict[str, np.ndarray], steps: int
) -> np.ndarray | None:
    """The average of the round's batch means of the first layer, from its running mean."""
    name = running_mean_name(got)
    if name is None:
        return None
    kept = (1 - MOMENTUM) ** steps
    return (got[name] - kept * sent[name]) / (1 - kept)


def predictions(model, x: torch.Tensor, cols: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        z = model.embed(x)
        return torch.log_softmax(model.logits(z)[:, cols], -1), z


def attack(
    model_before,
    model_after,
    sent: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    expert: LocalExpert,
    plan: RoundPlan,
    result,
    public_x: np.ndarray,
    seed: int,
) -> dict[str, float | None]:
    triples = local_triples(expert, plan.vocabulary)
    train, held = triples.split(
        plan.training.holdout, client_seed(plan.training.seed, expert.pseudonym, 0)
    )
    # The steps the server can work out: the client's batch size rule and its example count
    # (training skips a last batch of one example).
    batch = plan.federation.client_batch_size(result.n_examples, plan.training)
    per_epoch = result.n_examples // batch + (result.n_examples % batch >= 2)
    estimate = recover_activation_mean(sent, got, per_epoch * plan.federation.local_epochs)
    with torch.no_grad():
        truth = channel_mean(first_layer(model_after, torch.from_numpy(train.x)))
        # What the server guesses with no client data: the same layer on public data.
        public = channel_mean(first_layer(model_after, torch.from_numpy(public_x)))
    norm = float(np.linalg.norm(truth))
    error = None if estimate is None else float(np.linalg.norm(estimate - truth) / norm)
    baseline = float(np.linalg.norm(public - truth) / norm)
    cols = [plan.vocabulary.index(c) for c in expert.labels]
    scores = []
    for part in (train, held):
        x = torch.from_numpy(part.x)
        before, z0 = predictions(model_before, x, cols)
        after, z1 = predictions(model_after, x, cols)
        kl = (after.exp() * (after - before)).sum(-1).numpy()
        shift = (z1 - z0).norm(dim=-1).numpy()
        scores.append((kl, shift))
    # Equal sizes on both sides: members drawn at random against half the non-members, and the
    # same procedure between the two halves of the non-members (its floor at these sizes).
    half = len(held.x) // 2
    pick = np.random.default_rng(seed).choice(len(train.x), half, replace=False)
    members = tuple(s[pick] for s in scores[0])
    first, second = tuple(s[:half] for s in scores[1]), tuple(s[half : 2 * half] for s in scores[1])
    membership = better_auc(members, first)
    null = better_auc(second, first)
    freq = np.bincount(expert.answers.argmax(1), minlength=len(expert.labels)) + 1.0
    bias = np.array(result.distribution.head.label_bias)
    prior = float(np.corrcoef(bias, np.log(freq / freq.sum()))[0, 1]) if bias.std() > 0 else 0.0
    return {
        "activation_error": error,
        "activation_baseline": baseline,
        "membership_auc": membership,
        "membership_null": null,
        "label_prior_r": prior,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.privacy", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--seeds", type=int, nargs="+", default=list(REPORT_SEEDS))
    p.add_argument("--tasks", type=int, default=10, help="new 5-way tasks per seed")
    p.add_argument("--max-test", type=int, default=300)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "attacks": [], "rows": []}
    recipes = DEFAULT_RECIPES
    banks = {name: ({"normalization": norm}, {}) for name, norm in MODES.items()}
    for seed in args.seeds:
        world = build_world(args.dataset, seed, recipes, banks, None, [], ceiling=False)
        qx = world.splits.queries.x
        for mode, norm in MODES.items():
            bank = world.banks[mode]
            vocabulary = tuple(bank.meta.label_names)
            config = config_for(
                qx.shape[1],
                len(vocabulary),
                1,
                ModelSettings(normalization=norm),
                world.dataset.image_shape,
            )
            model_config = {
                k: v for k, v in asdict(config).items() if k not in ("n_labels", "n_experts")
            }
            torch.manual_seed(seed)
            starts = {
                "first round": shared_arrays(family("discriminative").build(asdict(config))),
                "trained bank": shared_arrays(bank.model),
            }
            training = TrainingSettings(seed=seed)
            plan = RoundPlan(
                2, "consensus", 1, 20, vocabulary, model_config, training, FederationSettings()
            )
            index = {c: i for i, c in enumerate(world.triples.label_names)}
            # Each client its own disjoint shard of the pool (bench.federated's "shards"): a
            # client's held-out queries are then nobody's training data, so membership of its
            # queries is also a question about what every organization receives.
            shards = shard_rows(len(qx), len(world.experts), seed)
            experts = [
                LocalExpert(
                    e.name,
                    e.labels,
                    qx[rows],
                    world.triples.eta[rows, i][:, [index[c] for c in e.labels]],
                    len(rows),
                )
                for i, (e, rows) in enumerate(zip(world.experts, shards, strict=True))
            ]

            def model_of(arrays: dict[str, np.ndarray], config=config):
                model = family("discriminative").build(asdict(config))
                load_shared(model, arrays)
                return model.eval()

            for start, sent in starts.items():
                replies = [run_round(expert, plan, sent, {}) for expert in experts]
                # What the server receives from each client, and (the federation's default
                # norm only) what every organization receives: the round's combination, plain
                # or under DP at each budget.
                views = {mode: [r.shared for r in replies]}
                if norm == BROADCAST_NORM:
                    for name, arrays in broadcasts(sent, replies, experts, vocabulary, seed):
                        views[name] = [arrays] * len(experts)
                for view, got in views.items():
                    for expert, result, arrays in zip(experts, replies, got, strict=True):
                        row = attack(
                            model_of(sent),
                            model_of(arrays),
                            sent,
                            arrays,
                            expert,
                            plan,
                            result,
                            world.splits.test.x[:2000],
                            seed,
                        )
                        if view != mode:  # a broadcast holds no client's head
                            row["label_prior_r"] = None
                        results["attacks"].append(
                            {
                                "seed": seed,
                                "mode": view,
                                "client": expert.pseudonym,
                                "start": start,
                                **row,
                            }
                        )
                        log(f"seed {seed} {view} {expert.pseudonym} {start}: {row}")
        tasks = episode_tasks(recipes, world.dataset.label_names, [5], args.tasks, seed)
        for r in score(dict(world.banks), world, tasks, seed, args.max_test, zero_shot=False):
            results["rows"].append({"seed": seed, **r})
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (args.out / "results.md").write_text(report(results))
    print(report(results))
    return 0


def report(results: dict) -> str:
    seeds = sorted({a["seed"] for a in results["attacks"]})
    lines = [
        "# A curious server's attacks on one client's round, per privacy mode",
        "",
        f"Settings: {results['args']}",
        "",
        f"Mean over the five clients and seeds {seeds} (min-max in brackets). Activation mean: "
        "relative error of the attack's estimate (— : nothing in the reply to read it from). "
        "Public-data guess: the same layer's mean on 2,000 images of the dataset's test split, "
        "which needs nothing from the client. Membership: AUC of the attacker's better score, "
        "members (drawn at random) against half the non-members; the null split runs the same "
        "procedure, at the same sizes, between the two halves of the non-members, so the gap "
        "between the two is what the round gives away. Label prior: correlation of "
        "the imitation head's biases with the log frequency of each label in the expert's "
        "answers.",
        "",
        "| mode | round starts from | activation mean, relative error | the same, guessed "
        "from public data | membership AUC | membership AUC, null split | label prior r |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(values: list[float | None], fmt: str) -> str:
        vals = [v for v in values if v is not None]
        if not vals:
            return "—"
        return f"{np.mean(vals):{fmt}} [{min(vals):{fmt}}-{max(vals):{fmt}}]"

    views = list(MODES) + [PLAIN_BROADCAST] + [dp_view(e) for e in DP_EPSILONS]
    for mode in views:
        for start in ("first round", "trained bank"):
            rows = [a for a in results["attacks"] if a["mode"] == mode and a["start"] == start]
            if not rows:
                continue
            lines.append(
                f"| {mode} | {start} | {cell([r['activation_error'] for r in rows], '.3f')} | "
                f"{cell([r['activation_baseline'] for r in rows], '.3f')} | "
                f"{cell([r['membership_auc'] for r in rows], '.3f')} | "
                f"{cell([r['membership_null'] for r in rows], '.3f')} | "
                f"{cell([r['label_prior_r'] for r in rows], '.2f')} |"
            )
    base, other = list(MODES)
    if results["rows"]:
        s = summarize(results["rows"], other, base)
        lines += [
            "",
            "New-task accuracy of each mode's central bank (5-way, %), paired on the same "
            "episodes:",
            "",
            "| | " + " | ".join(f"k = {k}" for k in SHOTS) + " |",
            "|---|" + "---|" * len(SHOTS),
            f"| {base} | " + " | ".join(f"{s[k][base]:.1f}" for k in SHOTS) + " |",
            f"| {other} | " + " | ".join(f"{s[k][other]:.1f}" for k in SHOTS) + " |",
            "| gap | "
            + " | ".join(f"{s[k]['gap']:+.2f} ± {s[k]['gap_se']:.2f}" for k in SHOTS)
            + " |",
        ]
    lines += [
        "",
        "The everyone's-view rows attack each client through what every organization receives "
        "after the round (the combination of the five clients' updates), plain and under DP with "
        f"the noise calibrated to each epsilon over {DP_ROUNDS} rounds (delta 1e-5, clip 0.3). "
        "The server receives each update before the noise: under DP its view is the plain "
        "rows'. One torch thread. Secure aggregation: not in this release.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
