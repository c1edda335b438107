"""How good could plan selection be? Many plans at one target, each checked on the held-out
calibration data (what lmopt chooses by) and on the evaluation images (what a user sees).

    python bench/bench_plan_space.py --models efficientnet_lite0 --fold 1 --targets 1.25 --plans 60

The plans come from lmopt's own DP on damages perturbed at random (log-normal noise of --spread), on
the study's latency table fit through one measured plan (as `lmopt optimize` re-plans), so every
plan is predicted at the same speed-up. For each distinct plan: its damage on the held-out
calibration data, and its agreement with the original on the evaluation images. The output says
how far the plan lmopt picks (least held-out damage) is from the best plan of the lot on the
evaluation images, an oracle no user has, and how well held-out damage ranks the plans. Nothing
here is timed except the one measurement the table is fit to; run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from bench_accuracy import add_run_arguments, study_of


def ranks(values) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, ["efficientnet_lite0"], [1.25], 0, "plan_space")
    parser.add_argument("--plans", type=int, default=60, help="perturbed DP runs (distinct plans are fewer)")
    parser.add_argument("--spread", type=float, default=0.6, help="sigma of the log-normal damage noise")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from lmopt.metrics import compare
    from lmopt.runtime import run_outputs
    from lmopt.select import choose

    rng = np.random.default_rng(args.seed)
    for name in args.models:
        study, _, _ = study_of(name, args)
        reference = run_outputs(study.prepared.model, study.data.eval)
        for target in args.targets:
            # The table lmopt re-plans on: fit through the measurement of its first plan.
            plan, _, _, _, table, checks = study.choose_measured(target, rounds=0)
            lmopt_keys = [c.key for c in plan.changes]
            seen, rows = set(), []
            for trial in range(args.plans + 1):
                damages = dict(study.scores.damage)
                if trial:  # trial 0: the unperturbed damages, lmopt's own plan on this table
                    damages = {k: v * float(np.exp(rng.normal(0.0, args.spread))) for k, v in damages.items()}
                candidate = choose(table, study.prepared.chain_lengths, study.prepared.candidates, damages,
                                   target, "layermerge", study.prepared.segments)
                keys = tuple(sorted(c.key for c in candidate.changes))
                if keys in seen or not candidate.target_met:
                    continue
                seen.add(keys)
                built = study.checker.applied(candidate.changes)
                fidelity = compare(reference, run_outputs(built, study.data.eval))
                rows.append({"changes": list(keys), "predicted": candidate.predicted_speedup,
                             "summed_damage": sum(study.scores.damage[k] for k in keys),
                             "check_damage": study.checker.damage(built),
                             "confident": fidelity["confident_agreement"], "top1": fidelity["top1_agreement"],
                             "kl": fidelity["kl"], "lmopt": sorted(keys) == sorted(lmopt_keys)})
                print(f"{len(rows):3d} {rows[-1]['predicted']:.3f}x check {rows[-1]['check_damage']:.3f} "
                      f"confident {100 * rows[-1]['confident']:.1f}% all {100 * rows[-1]['top1']:.1f}% "
                      f"{' '.join(keys)}", flush=True)
            rows.sort(key=lambda r: r["check_damage"])
            check, confident = [r["check_damage"] for r in rows], [r["confident"] for r in rows]
            summed = [r["summed_damage"] for r in rows]
            rho = float(np.corrcoef(ranks(check), ranks([-c for c in confident]))[0, 1]) if len(rows) > 2 else None
            rho_summed = float(np.corrcoef(ranks(summed), ranks([-c for c in confident]))[0, 1]) \
                if len(rows) > 2 else None
            best = max(rows, key=lambda r: r["confident"])
            summary = {"model": name, "fold": args.fold, "target": target, "plans": len(rows),
                       "measured_first_plan": checks[0]["measured_speedup"],
                       "least_check_damage": rows[0], "best_on_evaluation": best,
                       "spearman_check_vs_confident": rho, "spearman_summed_vs_confident": rho_summed,
                       "confident_n": compare(reference, reference)["confident_count"], "rows": rows}
            path = args.out / f"{name}_fold{args.fold}_{target:g}.json"
            path.write_text(json.dumps(summary, indent=1))
            print(f"\n{name} fold {args.fold} at {target:g}x: {len(rows)} distinct plans; least held-out damage "
                  f"{rows[0]['check_damage']:.3f} -> {100 * rows[0]['confident']:.1f}% confident; best on the "
                  f"evaluation images {100 * best['confident']:.1f}% (held-out damage {best['check_damage']:.3f}, "
                  f"rank {rows.index(best) + 1}); Spearman(held-out damage, -confident) {rho:.2f}, "
                  f"summed damage {rho_summed:.2f}; {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
