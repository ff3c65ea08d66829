"""The KL penalty's trade: paired gain and KL to the base model, with and without it, per seed.

    python bench/learning.py --task compressibility --seeds 5 6 7 --no-control \
        --out bench/results/learning_fresh_seeds.json                      # kl_coef 0
    python bench/learning.py --task compressibility --seeds 5 6 7 --no-control \
        --set train.kl_coef=0.01 --out /tmp/kl001.json
    python bench/kl_penalty.py --runs 0=bench/results/learning_fresh_seeds.json 0.01=/tmp/kl001.json

Reads `bench/learning.py` result files (one per kl_coef, any seeds) and, for each seed that every
file has, prints the final gain and KL of each coefficient as a share of kl_coef 0's, and plots
both curves over the evaluations. The target (issue 16): at most half the KL, at least half the
gain. Writes bench/results/kl_penalty_seeds.json and .png.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tyro
from common import markdown_table, write_json


@dataclass(frozen=True)
class Args:
    runs: tuple[str, ...]
    """COEF=PATH[,PATH...] for each kl_coef; the first is the reference (normally 0)."""
    out: Path = Path("bench/results/kl_penalty_seeds.json")


def curves(path: Path) -> dict[int, dict[str, list[float]]]:
    """seed -> epoch, paired gain since the start, KL to the base model."""
    result = {}
    for row in json.loads(path.read_text())["seeds"]:
        evals = row["run"]["evals"]
        start = evals[0]["rewards"]
        result[row["seed"]] = {
            "epoch": [e["epoch"] for e in evals],
            "gain": [
                sum(b - a for a, b in zip(start, e["rewards"], strict=True)) / len(start)
                for e in evals
            ],
            "kl_base": [e["kl_base"] for e in evals],
        }
    return result


def main(args: Args) -> None:
    runs = {}
    for item in args.runs:
        coef, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--runs {item!r}: write COEF=PATH[,PATH], e.g. 0.01=/tmp/kl001.json")
        runs[coef] = {s: c for p in path.split(",") for s, c in curves(Path(p)).items()}
    reference, *others = runs
    seeds = sorted(set.intersection(*(set(c) for c in runs.values())))
    rows = []
    for seed in seeds:
        ref = runs[reference][seed]
        for coef in others:
            r = runs[coef][seed]
            gain_share = r["gain"][-1] / ref["gain"][-1]
            kl_share = r["kl_base"][-1] / ref["kl_base"][-1]
            met = kl_share <= 0.5 and gain_share >= 0.5
            rows.append(
                [
                    seed,
                    coef,
                    f"{ref['gain'][-1]:+.3f} / {r['gain'][-1]:+.3f}",
                    f"{gain_share:.0%}",
                    f"{ref['kl_base'][-1]:.2f} / {r['kl_base'][-1]:.2f}",
                    f"{kl_share:.0%}",
                    "met" if met else "not met",
                ]
            )
    header = ["seed", "kl_coef", f"gain ({reference} / coef)", "gain kept", "KL", "KL kept", ""]
    print(markdown_table(header, rows))
    write_json(args.out, {"runs": list(args.runs), "curves": runs, "table": rows})
    plot(runs, seeds, args.out.with_suffix(".png"))


def plot(runs: dict, seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    styles = ["-", "--", ":", "-."]
    for i, (coef, by_seed) in enumerate(runs.items()):
        for j, seed in enumerate(seeds):
            c = by_seed[seed]
            label = f"kl_coef {coef}, seed {seed}"
            colour = f"C{j}"
            left.plot(c["epoch"], c["gain"], styles[i % 4], color=colour, marker="o", label=label)
            right.plot(c["epoch"], c["kl_base"], styles[i % 4], color=colour, marker="o")
    left.set(xlabel="epoch", ylabel="paired gain since the start", title="reward")
    right.set(xlabel="epoch", ylabel="KL to the base model", title="distance from the base")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args))
